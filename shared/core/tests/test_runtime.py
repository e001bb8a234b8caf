import random

import numpy as np
import pytest
import torch

from verger.core import resolve_device, seed_everything


def test_seed_everything_repeats_every_generator():
    def draw():
        g = seed_everything(123)
        return random.random(), np.random.rand(), torch.rand(3), torch.rand(2, generator=g)

    a, b = draw(), draw()
    assert a[0] == b[0] and a[1] == b[1]
    assert torch.equal(a[2], b[2]) and torch.equal(a[3], b[3])
    seed_everything(124)
    assert not torch.equal(torch.rand(3), a[2])


@pytest.mark.parametrize("bad", [-1, 2**63, 1.5, "7", True])
def test_seed_rejects_bad_values(bad):
    with pytest.raises(ValueError, match="seed="):
        seed_everything(bad)


def test_resolve_device():
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device(torch.device("cpu")).type == "cpu"
    assert resolve_device("auto").type in {"cpu", "cuda", "mps"}
    with pytest.raises(ValueError, match="device='gpu0'"):
        resolve_device("gpu0")
    if not torch.cuda.is_available():
        with pytest.raises(RuntimeError, match="no CUDA device"):
            resolve_device("cuda")
