from __future__ import annotations

import pytest
import torch

from verger.maeclip.masking import (
    gather_tokens,
    num_kept,
    patchify,
    random_masking,
    unpatchify,
)


@pytest.mark.parametrize("n", [16, 49, 64, 196])
@pytest.mark.parametrize("ratio", [0.0, 0.25, 0.5, 0.75, 0.9])
def test_exactly_round_n_one_minus_r_patches_are_kept(n, ratio):
    m = random_masking(5, n, ratio, generator=torch.Generator().manual_seed(n))
    expected = max(1, round(n * (1 - ratio)))
    assert m.ids_keep.shape == (5, expected)
    assert num_kept(n, ratio) == expected
    # the mask hides exactly the others, and hides none of the kept indices
    assert torch.equal(m.mask.sum(dim=1), torch.full((5,), float(n - expected)))
    assert torch.all(torch.gather(m.mask, 1, m.ids_keep) == 0)
    # kept indices are distinct per sample
    for row in m.ids_keep:
        assert len(set(row.tolist())) == expected


def test_restore_indices_invert_the_shuffle():
    b, n, d = 4, 20, 3
    x = torch.randn(b, n, d)
    noise = torch.rand(b, n, generator=torch.Generator().manual_seed(0))
    m = random_masking(b, n, 0.6, noise=noise)
    shuffle = torch.argsort(noise, dim=1)
    shuffled = gather_tokens(x, shuffle)
    assert torch.equal(gather_tokens(shuffled, m.ids_restore), x)
    assert torch.equal(gather_tokens(x, m.ids_keep), shuffled[:, : m.ids_keep.shape[1]])
    # ids_restore is a permutation composing with the shuffle to the identity
    assert torch.equal(torch.gather(shuffle, 1, m.ids_restore), torch.arange(n).expand(b, n))


def test_masks_differ_per_sample_and_follow_the_generator():
    a = random_masking(8, 64, 0.75, generator=torch.Generator().manual_seed(1))
    b = random_masking(8, 64, 0.75, generator=torch.Generator().manual_seed(1))
    assert torch.equal(a.ids_keep, b.ids_keep)
    assert len({tuple(r.tolist()) for r in a.mask}) == 8


@pytest.mark.parametrize("bad", [1.0, 1.5, -0.1, float("nan")])
def test_mask_ratio_outside_unit_interval_is_refused(bad):
    with pytest.raises(ValueError, match=r"mask_ratio=.* must be in \[0, 1\)|mask_ratio=.*<= 1"):
        num_kept(16, bad)
    with pytest.raises(ValueError, match="mask_ratio"):
        random_masking(2, 16, bad)


def test_mask_ratio_type_and_noise_shape_errors():
    with pytest.raises(ValueError, match=r"mask_ratio='0\.5' must be a finite number"):
        num_kept(16, "0.5")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="noise has shape"):
        random_masking(2, 16, 0.5, noise=torch.rand(2, 15))


def test_patchify_round_trip_and_layout():
    images = torch.randn(2, 3, 8, 12)
    patches = patchify(images, 4)
    assert patches.shape == (2, 6, 4 * 4 * 3)
    # patch 1 (row 0, column 1) holds pixels [:, 0:4, 4:8], channel last
    assert torch.equal(patches[0, 1].view(4, 4, 3), images[0, :, 0:4, 4:8].permute(1, 2, 0))
    assert torch.equal(unpatchify(patches, 4, (2, 3)), images)


def test_patchify_refuses_indivisible_sizes():
    with pytest.raises(ValueError, match="not divisible by the patch size 4"):
        patchify(torch.randn(1, 3, 30, 32), 4)
