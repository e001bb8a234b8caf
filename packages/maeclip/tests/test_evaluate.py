from __future__ import annotations

import pytest
import torch

from verger.maeclip import MAECLIP, MAECLIPConfig
from verger.maeclip.data import ImageTextSet
from verger.maeclip.evaluate import (
    fit_logistic_regression,
    linear_probe_accuracy,
    recall_at_k,
    zero_shot_classifier,
)


def test_recall_at_k_closed_form():
    assert recall_at_k(torch.eye(4), ks=(1,)) == {1: 1.0}
    # query i's match ranks i-th (0-based) among 4 items: recall@k = k/4
    sim = torch.tensor([[4.0, 3, 2, 1], [4, 3, 2, 1], [4, 3, 2, 1], [4, 3, 2, 1]])
    assert recall_at_k(sim, ks=(1, 2, 3, 4)) == {1: 0.25, 2: 0.5, 3: 0.75, 4: 1.0}
    with pytest.raises(ValueError, match="square"):
        recall_at_k(torch.zeros(2, 3))


def test_logistic_regression_separates_separable_classes():
    g = torch.Generator().manual_seed(0)
    centres = torch.randn(3, 5, generator=g) * 4
    y = torch.arange(300) % 3
    x = centres[y] + torch.randn(300, 5, generator=g) * 0.5
    w, b = fit_logistic_regression(x, y, num_classes=3)
    assert float(((x.double() @ w + b).argmax(1) == y).double().mean()) == 1.0


def test_linear_probe_reads_labels_from_frozen_features():
    """Images whose class is written in their pixels: a probe on even a random ViT finds it."""
    torch.manual_seed(0)
    model = MAECLIP(MAECLIPConfig(model_name="maeclip-micro"))
    g = torch.Generator().manual_seed(1)
    labels = torch.arange(240) % 2
    images = torch.randn(240, 3, 16, 16, generator=g) * 0.3
    images[:, :, :8] += (labels.float() * 2 - 1).view(-1, 1, 1, 1)  # class = top-half brightness
    data = ImageTextSet(images=images, captions=["x"] * 240, labels=labels, class_names=["a", "b"])
    acc = linear_probe_accuracy(model, data.subset(range(160)), data.subset(range(160, 240)))
    assert acc > 0.95
    shuffled = ImageTextSet(
        images=images, captions=["x"] * 240, labels=labels[torch.randperm(240, generator=g)]
    )
    assert (
        linear_probe_accuracy(model, shuffled.subset(range(160)), shuffled.subset(range(160, 240)))
        < 0.75
    )


def test_zero_shot_classifier_is_normalised_per_class(tokenizer_micro):
    torch.manual_seed(0)
    model = MAECLIP(MAECLIPConfig(model_name="maeclip-micro"))
    weights = zero_shot_classifier(model, tokenizer_micro, ["one", "two", "three"])
    assert weights.shape == (32, 3)
    torch.testing.assert_close(weights.norm(dim=0), torch.ones(3))
    with pytest.raises(ValueError, match="non-empty"):
        zero_shot_classifier(model, tokenizer_micro, [])
