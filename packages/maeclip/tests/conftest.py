"""Shared fixtures: small thread counts (the CI machine has 2 shared cores) and tiny models."""

from __future__ import annotations

import pytest
import torch

from verger.core.testing import setup_triton_interpreter

setup_triton_interpreter()
torch.set_num_threads(1)  # shared 2-core machines: more threads only contend


@pytest.fixture(scope="session")
def tokenizer_micro():
    from verger.maeclip import CaptionTokenizer

    return CaptionTokenizer.for_model("maeclip-micro")


@pytest.fixture(scope="session")
def mnist_micro():
    """The embedded MNIST pairs at the micro model's 16x16 size."""
    from verger.maeclip import mnist_pairs

    return mnist_pairs(image_size=16)
