from __future__ import annotations

import json

import open_clip
import pytest
import torch
import torch.nn.functional as F

from verger.maeclip import MAECLIP, CaptionTokenizer, MAECLIPConfig, mae_loss, patchify

MICRO = "maeclip-micro"


def _batch(tokenizer, b=6, size=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    images = torch.randn(b, 3, size, size, generator=g)
    texts = tokenizer([f"a picture of thing {i}" for i in range(b)])
    return images, texts


def _model(seed=0, **kw):
    torch.manual_seed(seed)
    return MAECLIP(MAECLIPConfig(model_name=MICRO, **kw))


def test_unmasked_encoder_path_is_open_clips_visual(tokenizer_micro):
    model = _model()
    images, _ = _batch(tokenizer_micro)
    pooled, tokens, masking = model.encode_image(images)
    torch.testing.assert_close(pooled, model.clip.visual(images), rtol=0, atol=0)
    assert masking is None and tokens.shape == (6, 16, 32)


def test_masked_encoder_sees_only_kept_patches(tokenizer_micro):
    """Changing a hidden patch's pixels must not change the masked-branch features."""
    model = _model()
    images, _ = _batch(tokenizer_micro)
    noise = torch.rand(6, 16, generator=torch.Generator().manual_seed(3))
    pooled, tokens, m = model.encode_image(images, mask_ratio=0.75, noise=noise)
    assert tokens.shape == (6, 4, 32)
    hidden = int(m.mask[0].nonzero()[0])
    row, col = divmod(hidden, 4)
    edited = images.clone()
    edited[0, :, row * 4 : row * 4 + 4, col * 4 : col * 4 + 4] += 5.0
    pooled2, _, _ = model.encode_image(edited, mask_ratio=0.75, noise=noise)
    torch.testing.assert_close(pooled2, pooled)
    kept = int(m.ids_keep[0, 0])
    row, col = divmod(kept, 4)
    edited[0, :, row * 4 : row * 4 + 4, col * 4 : col * 4 + 4] += 5.0
    assert not torch.allclose(
        model.encode_image(edited, mask_ratio=0.75, noise=noise)[0][0], pooled[0]
    )


def test_mae_loss_counts_masked_patches_only():
    g = torch.Generator().manual_seed(0)
    target_images = torch.randn(3, 3, 8, 8, generator=g)
    target = patchify(target_images, 4)
    pred = torch.randn(3, 4, 48, generator=g)
    mask = torch.tensor([[1.0, 0, 1, 0], [0, 0, 1, 1], [1, 1, 1, 0]])
    loss = mae_loss(pred, target, mask, norm_pix=False)
    # closed form: mean over masked patches of the per-patch MSE
    per_patch = ((pred - target) ** 2).mean(-1)
    torch.testing.assert_close(loss, per_patch[mask.bool()].mean())
    # changing predictions on kept patches changes nothing; on a masked patch it does
    moved = pred.clone()
    moved[mask == 0] += 10.0
    torch.testing.assert_close(mae_loss(moved, target, mask, norm_pix=False), loss)
    moved[0, 0] += 1.0
    assert mae_loss(moved, target, mask, norm_pix=False) > loss


def test_norm_pix_loss_targets_are_per_patch_standardised():
    target = patchify(torch.randn(2, 3, 8, 8) * 7 + 3, 4)
    mean = target.mean(-1, keepdim=True)
    std = (target.var(-1, keepdim=True) + 1e-6).sqrt()
    mask = torch.ones(2, 4)
    assert mae_loss((target - mean) / std, target, mask).item() < 1e-10
    assert mae_loss(target, target, mask).item() > 1.0


def test_model_mae_loss_matches_manual_computation(tokenizer_micro):
    model = _model(clip_weight=0.0)
    images, _ = _batch(tokenizer_micro)
    noise = torch.rand(6, 16, generator=torch.Generator().manual_seed(1))
    out = model(images, noise=noise)
    _, tokens, m = model.encode_image(images, mask_ratio=0.75, noise=noise)
    pred = model.decoder(tokens, m.ids_restore)
    torch.testing.assert_close(out.mae_loss, mae_loss(pred, patchify(images, 4), m.mask))
    assert out.clip_loss is None and torch.equal(out.loss, out.mae_loss)
    assert int(out.mask.sum()) == 6 * (16 - 4)


def test_with_mae_weight_zero_the_objective_is_open_clips_clip_loss(tokenizer_micro):
    model = _model(mae_weight=0.0)
    images, texts = _batch(tokenizer_micro)
    out = model(images, texts)
    clip = model.clip
    img = clip.encode_image(images, normalize=True)
    txt = clip.encode_text(texts, normalize=True)
    expected = open_clip.ClipLoss()(img, txt, clip.logit_scale.exp())
    torch.testing.assert_close(out.loss, expected, rtol=1e-6, atol=1e-6)
    # and by hand: symmetric cross-entropy of the scaled cosine similarities
    logits = clip.logit_scale.exp() * img @ txt.T
    labels = torch.arange(6)
    by_hand = (F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels)) / 2
    torch.testing.assert_close(out.loss, by_hand, rtol=1e-6, atol=1e-6)


def test_combined_objective_is_the_weighted_sum(tokenizer_micro):
    model = _model(mae_weight=0.3, clip_weight=2.0)
    images, texts = _batch(tokenizer_micro)
    noise = torch.rand(6, 16)
    out = model(images, texts, noise=noise)
    torch.testing.assert_close(out.loss, 2.0 * out.clip_loss + 0.3 * out.mae_loss)


def test_gradients_reach_both_towers_and_the_decoder(tokenizer_micro):
    model = _model()
    images, texts = _batch(tokenizer_micro)
    model(images, texts).loss.backward()
    groups = {
        "image tower": model.clip.visual,
        "text tower": model.clip.transformer,
        "token embedding": model.clip.token_embedding,
        "decoder": model.decoder,
    }
    for name, module in groups.items():
        grads = [p.grad for p in module.parameters() if p.requires_grad]
        assert grads and all(g is not None for g in grads), name
        assert sum(float(g.abs().sum()) for g in grads) > 0, name
    assert model.clip.logit_scale.grad is not None
    assert float(model.decoder.mask_token.grad.abs().sum()) > 0


@pytest.mark.parametrize("contrastive_input,passes", [("full", 2), ("masked", 1)])
def test_masked_contrastive_input_shares_the_mae_encoder_pass(
    tokenizer_micro, contrastive_input, passes
):
    model = _model(contrastive_input=contrastive_input)
    calls = []
    model.clip.visual.transformer.register_forward_hook(lambda m, i, o: calls.append(i[0].shape[1]))
    images, texts = _batch(tokenizer_micro)
    out = model(images, texts)
    assert len(calls) == passes
    assert calls[0] == 1 + 4  # the MAE pass: class token + 25% of 16 patches
    if contrastive_input == "full":
        assert calls[1] == 1 + 16
    torch.testing.assert_close(out.loss, out.clip_loss + out.mae_loss)


def test_flip_ratio_differs_from_mae_ratio_runs_a_second_masked_pass(tokenizer_micro):
    model = _model(contrastive_input="masked", contrastive_mask_ratio=0.5)
    calls = []
    model.clip.visual.transformer.register_forward_hook(lambda m, i, o: calls.append(i[0].shape[1]))
    model(*_batch(tokenizer_micro))
    assert calls == [1 + 4, 1 + 8]


def test_bad_image_size_and_inputs_give_clear_errors(tokenizer_micro):
    model = _model()
    _, texts = _batch(tokenizer_micro)
    with pytest.raises(ValueError, match="not divisible by the patch size 4"):
        model(torch.randn(6, 3, 18, 18), texts)
    with pytest.raises(ValueError, match="differs from the model"):
        model(torch.randn(6, 3, 20, 20), texts)
    with pytest.raises(ValueError, match=r"\[B, C, H, W\]"):
        model(torch.randn(3, 16, 16), texts)
    with pytest.raises(ValueError, match="texts are required"):
        model(torch.randn(6, 3, 16, 16))
    with pytest.raises(ValueError, match="5 captions for 6 images"):
        model(torch.randn(6, 3, 16, 16), texts[:5])


def test_model_config_with_indivisible_image_size_is_refused(tmp_path):
    config = json.loads(open_clip.get_model_config(MICRO).__repr__().replace("'", '"'))
    config["vision_cfg"]["image_size"] = 18
    (tmp_path / "maeclip-test-odd.json").write_text(json.dumps(config))
    open_clip.add_model_config(tmp_path / "maeclip-test-odd.json")
    with pytest.raises(ValueError, match="not divisible by the patch size 4"):
        MAECLIP(MAECLIPConfig(model_name="maeclip-test-odd"))


def test_empty_captions_are_refused():
    tok = CaptionTokenizer(16)
    with pytest.raises(ValueError, match=r"captions\[1\] is empty"):
        tok(["a digit", "   "])
    with pytest.raises(TypeError, match=r"captions\[0\]"):
        tok([None])  # type: ignore[list-item]


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"mask_ratio": 1.0}, "mask_ratio"),
        ({"mask_ratio": -0.2}, "mask_ratio"),
        ({"contrastive_mask_ratio": 1.0, "contrastive_input": "masked"}, "contrastive_mask_ratio"),
        ({"mae_weight": -1.0}, "mae_weight"),
        ({"mae_weight": 0.0, "clip_weight": 0.0}, "nothing to train"),
        ({"contrastive_input": "half"}, "contrastive_input"),
        ({"decoder_width": 30}, "decoder_width"),
        ({"decoder_head_width": 24}, "decoder_head_width"),
        ({"decoder_depth": 1.5}, "decoder_depth"),
        ({"clip_weight": float("nan")}, "clip_weight"),
        ({"mae_weight": float("inf")}, "mae_weight"),
        # MAE's loss counts hidden patches only: with none hidden it would be empty
        ({"mask_ratio": 0.0}, "MAE needs hidden patches"),
    ],
)
def test_config_validation(kwargs, match):
    with pytest.raises(ValueError, match=match):
        MAECLIPConfig(**kwargs)


def test_mask_ratio_zero_is_fine_without_mae(tokenizer_micro):
    out = _model(mask_ratio=0.0, mae_weight=0.0)(*_batch(tokenizer_micro))
    assert out.mae_loss is None and torch.isfinite(out.loss)


@pytest.mark.parametrize("bad", [-0.5, float("nan"), 1.0])
def test_encode_image_refuses_a_bad_mask_ratio(tokenizer_micro, bad):
    """A negative or NaN ratio must not silently mean "no masking"."""
    images, _ = _batch(tokenizer_micro)
    with pytest.raises(ValueError, match="mask_ratio"):
        _model().encode_image(images, mask_ratio=bad)


def test_unknown_model_name_is_refused():
    with pytest.raises(ValueError, match="not an open_clip config"):
        MAECLIP(MAECLIPConfig(model_name="ViT-Nope-1"))


def test_tokenizer_round_trip_and_context_length(tokenizer_micro):
    ids = tokenizer_micro(["a handwritten digit seven"])
    assert ids.shape == (1, 16)
    assert tokenizer_micro.decode(ids[0].tolist()) == "a handwritten digit seven"


@pytest.mark.parametrize("dtype", [torch.uint8, torch.float64, torch.int64])
def test_images_of_another_dtype_are_refused_naming_the_allowed_ones(tokenizer_micro, dtype):
    _, texts = _batch(tokenizer_micro)
    with pytest.raises(TypeError, match=rf"images\.dtype={dtype}.*float32.*normalise"):
        _model()(torch.zeros(6, 3, 16, 16, dtype=dtype), texts)


def test_half_precision_images_are_cast_to_the_model(tokenizer_micro):
    images, texts = _batch(tokenizer_micro)
    model = _model()
    noise = torch.rand(6, 16, generator=torch.Generator().manual_seed(0))
    out16 = model(images.to(torch.bfloat16), texts, noise=noise)
    torch.testing.assert_close(
        out16.loss, model(images.to(torch.bfloat16).float(), texts, noise=noise).loss
    )


def test_texts_are_checked_against_the_text_tower(tokenizer_micro):
    model = _model()
    images, texts = _batch(tokenizer_micro)
    with pytest.raises(ValueError, match=r"texts has shape \(6, 500\); expected \[B, 16\]"):
        model(images, torch.zeros(6, 500, dtype=torch.long))
    oov = texts.clone()
    oov[2, 3] = model.vocab_size
    with pytest.raises(ValueError, match=rf"token id {model.vocab_size}, outside .*\[0, 49408\)"):
        model(images, oov)
    with pytest.raises(ValueError, match=r"token id -1"):
        model(images, texts - 1)
    with pytest.raises(TypeError, match=r"texts must be a tensor of token ids.*CaptionTokenizer"):
        model(images, ["a cat"] * 6)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match=r"texts\.dtype=torch\.float32"):
        model(images, texts.float())
    with pytest.raises(TypeError, match="texts must be a tensor"):
        model.encode_text(["a cat"])  # type: ignore[arg-type]


def test_a_batch_of_zero_is_refused(tokenizer_micro):
    model = _model()
    _, texts = _batch(tokenizer_micro)
    with pytest.raises(ValueError, match="images holds a batch of 0"):
        model(torch.zeros(0, 3, 16, 16), texts[:0])
    with pytest.raises(ValueError, match="texts holds a batch of 0"):
        model.encode_text(texts[:0])
    with pytest.raises(TypeError, match="images must be a float tensor"):
        model([[0.0]])  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="captions is empty"):
        tokenizer_micro([])
