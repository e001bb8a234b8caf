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
