"""CUDA-only checks (run by the tests_gpu session / ci/gpu-check.sh)."""

from __future__ import annotations

import pytest
import torch

from verger.maeclip import CaptionTokenizer, MAECLIPConfig, build_model

pytestmark = pytest.mark.gpu


@pytest.mark.parametrize("contrastive_input", ["full", "masked"])
def test_vit_b16_maeclip_step_on_cuda_bf16(contrastive_input):
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    cfg = MAECLIPConfig(
        model_name="ViT-B-16",
        decoder_width=512,
        decoder_depth=8,
        contrastive_input=contrastive_input,
    )
    model = build_model(cfg, device="cuda")
    images = torch.randn(8, 3, 224, 224, device="cuda")
    texts = CaptionTokenizer.for_model("ViT-B-16")([f"photo {i}" for i in range(8)]).cuda()
    with torch.autocast("cuda", dtype=torch.bfloat16):
        out = model(images, texts)
    out.loss.backward()
    assert torch.isfinite(out.loss)
    assert out.mask.sum().item() == 8 * (196 - 49)
    assert model.decoder.mask_token.grad is not None
    assert model.clip.token_embedding.weight.grad is not None


def test_cpu_and_cuda_losses_agree_in_fp32():
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    torch.manual_seed(0)
    cpu = build_model(MAECLIPConfig(model_name="maeclip-tiny"))
    gpu = build_model(MAECLIPConfig(model_name="maeclip-tiny"), device="cuda")
    gpu.load_state_dict(cpu.state_dict())
    images = torch.randn(16, 3, 32, 32)
    texts = CaptionTokenizer.for_model("maeclip-tiny")([f"digit {i}" for i in range(16)])
    noise = torch.rand(16, 64)
    a = cpu(images, texts, noise=noise)
    b = gpu(images.cuda(), texts.cuda(), noise=noise.cuda())
    torch.testing.assert_close(b.loss.cpu(), a.loss, rtol=1e-3, atol=1e-4)


def test_resume_on_cuda_matches_the_uninterrupted_run(tmp_path):
    """The checkpoint's RNG states must come back as CPU tensors (set_rng_state refuses CUDA)."""
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    import shutil

    from verger.maeclip import TrainConfig, mnist_pairs, train

    data = mnist_pairs(image_size=16).subset(range(64))
    model_cfg = MAECLIPConfig(model_name="maeclip-micro")
    cfg = TrainConfig(steps=4, batch_size=16, warmup_steps=1, progress=False, device="cuda")
    straight = train(model_cfg, cfg, data)
    ckpt_cfg = TrainConfig(
        steps=4,
        batch_size=16,
        warmup_steps=1,
        progress=False,
        device="cuda",
        out_dir=tmp_path,
        checkpoint_every=2,
    )
    train(model_cfg, ckpt_cfg, data)
    shutil.rmtree(tmp_path / "checkpoints" / "step-00000004")
    (tmp_path / "checkpoints" / "latest").write_text("step-00000002\n")
    resumed = train(model_cfg, ckpt_cfg, data)
    assert resumed.resumed_from == 2
    assert [h["loss"] for h in resumed.history] == pytest.approx(
        [h["loss"] for h in straight.history[2:]], rel=1e-5
    )
