"""Shared fixtures: a tiny trained model folder (verger.smalltalk.toy)."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch

from verger.core.testing import setup_triton_interpreter
from verger.smalltalk.toy import build_toy_mixture

setup_triton_interpreter()  # before anything imports a Triton kernel (verger.core.nn)
torch.set_num_threads(1)  # tiny models on small shared machines: threads only contend


@pytest.fixture(scope="session")
def trained_folder(tmp_path_factory) -> Path:
    """A complete tiny model folder (read-only for tests: copy it to change it)."""
    folder = tmp_path_factory.mktemp("smalltalk") / "model"
    build_toy_mixture(folder)
    return folder


@pytest.fixture
def model_copy(trained_folder, tmp_path) -> Path:
    """A private copy of :func:`trained_folder` that a test may change."""
    target = tmp_path / "model"
    shutil.copytree(trained_folder, target)
    return target
