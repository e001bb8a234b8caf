"""Evaluation: zero-shot classification, linear probe on frozen features, retrieval recall@k."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

from verger.maeclip.data import ZERO_SHOT_TEMPLATES, ImageTextSet
from verger.maeclip.model import MAECLIP
from verger.maeclip.towers import CaptionTokenizer


def _batches(n: int, batch_size: int) -> list[slice]:
    return [slice(i, min(i + batch_size, n)) for i in range(0, n, batch_size)]


@torch.no_grad()
def image_embeddings(
    model: MAECLIP, images: torch.Tensor, *, batch_size: int = 256
) -> torch.Tensor:
    """L2-normalised projected image features of the full images [N, E]."""
    model.eval()
    device = next(model.parameters()).device
    out = [
        model.encode_image(images[s].to(device), normalize=True)[0].float().cpu()
        for s in _batches(len(images), batch_size)
    ]
    return torch.cat(out)


@torch.no_grad()
def probe_features(model: MAECLIP, images: torch.Tensor, *, batch_size: int = 256) -> torch.Tensor:
    """Frozen encoder features for a linear probe: [pooled token, mean of patch tokens].

    Both are taken before the CLIP projection, so an MAE-only encoder (whose projection is
    never trained) is probed on what it learned; CLIP's pooled token is included as trained.
    """
    model.eval()
    device = next(model.parameters()).device
    feats = []
    for s in _batches(len(images), batch_size):
        pooled, tokens, _ = model.encode_image(images[s].to(device), project=False)
        feats.append(torch.cat([pooled, tokens.mean(dim=1)], dim=-1).float().cpu())
    return torch.cat(feats)


@torch.no_grad()
def text_embeddings(
    model: MAECLIP, tokenizer: CaptionTokenizer, texts: Sequence[str], *, batch_size: int = 256
) -> torch.Tensor:
    """L2-normalised projected text features [N, E]."""
    model.eval()
    device = next(model.parameters()).device
    out = []
    for s in _batches(len(texts), batch_size):
        tokens = tokenizer(list(texts[s])).to(device)
        out.append(model.encode_text(tokens, normalize=True).float().cpu())
    return torch.cat(out)


@torch.no_grad()
def zero_shot_classifier(
    model: MAECLIP,
    tokenizer: CaptionTokenizer,
    class_names: Sequence[str],
    templates: Sequence[str] = ZERO_SHOT_TEMPLATES,
) -> torch.Tensor:
    """[E, C] class weights: the normalised mean of each class's prompt embeddings (CLIP)."""
    if not class_names or not templates:
        raise ValueError("class_names and templates must be non-empty")
    weights = []
    for name in class_names:
        emb = text_embeddings(model, tokenizer, [t.format(name) for t in templates])
        weights.append(F.normalize(emb.mean(dim=0), dim=0))
    return torch.stack(weights, dim=1)


def zero_shot_accuracy(
    model: MAECLIP,
    tokenizer: CaptionTokenizer,
    data: ImageTextSet,
    templates: Sequence[str] = ZERO_SHOT_TEMPLATES,
) -> float:
    """Top-1 accuracy of argmax over class prompts on ``data`` (needs labels and class names)."""
    if data.labels is None or data.class_names is None:
        raise ValueError("zero-shot accuracy needs a labelled set with class_names")
    classifier = zero_shot_classifier(model, tokenizer, data.class_names, templates)
    pred = (image_embeddings(model, data.images) @ classifier).argmax(dim=1)
    return float((pred == data.labels).float().mean())


def fit_logistic_regression(
    x: torch.Tensor, y: torch.Tensor, *, num_classes: int, l2: float = 1e-3, iters: int = 100
) -> tuple[torch.Tensor, torch.Tensor]:
    """Multinomial logistic regression by full-batch L-BFGS: returns (weight [D, C], bias [C]).

    Minimises mean cross-entropy + ``l2 * ||W||^2``; a convex problem, so the result does
    not depend on the (zero) start beyond the iteration budget.
    """
    x = x.double()
    w = torch.zeros(x.shape[1], num_classes, dtype=torch.float64, requires_grad=True)
    b = torch.zeros(num_classes, dtype=torch.float64, requires_grad=True)
    opt = torch.optim.LBFGS([w, b], lr=1.0, max_iter=iters, line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        opt.zero_grad()
        loss = F.cross_entropy(x @ w + b, y) + l2 * w.pow(2).sum()
        loss.backward()
        return loss

    with torch.enable_grad():
        opt.step(closure)
    return w.detach(), b.detach()


def linear_probe_accuracy(
    model: MAECLIP, train: ImageTextSet, test: ImageTextSet, *, l2: float = 1e-3
) -> float:
    """Logistic regression on frozen, standardised :func:`probe_features`: test accuracy."""
    if train.labels is None or test.labels is None:
        raise ValueError("a linear probe needs labelled train and test sets")
    x_train = probe_features(model, train.images).double()
    x_test = probe_features(model, test.images).double()
    mean, std = x_train.mean(dim=0), x_train.std(dim=0).clamp_min(1e-6)
    num_classes = int(max(train.labels.max(), test.labels.max())) + 1
    w, b = fit_logistic_regression(
        (x_train - mean) / std, train.labels, num_classes=num_classes, l2=l2
    )
    pred = (((x_test - mean) / std) @ w + b).argmax(dim=1)
    return float((pred == test.labels).double().mean())


def recall_at_k(similarity: torch.Tensor, ks: Sequence[int] = (1, 5, 10)) -> dict[int, float]:
    """Query i's match is item i: the fraction of rows whose match ranks in the top k."""
    if similarity.ndim != 2 or similarity.shape[0] != similarity.shape[1]:
        raise ValueError(f"similarity must be square [N, N], got {tuple(similarity.shape)}")
    target = similarity.diagonal().unsqueeze(1)
    rank = (similarity > target).sum(dim=1)  # ties favour the match
    return {k: float((rank < k).float().mean()) for k in ks}


def retrieval_recall(
    model: MAECLIP,
    tokenizer: CaptionTokenizer,
    data: ImageTextSet,
    ks: Sequence[int] = (1, 5, 10),
) -> dict[str, float]:
    """Image->text and text->image recall@k on paired data: keys ``i2t_r@k``, ``t2i_r@k``."""
    sim = image_embeddings(model, data.images) @ text_embeddings(model, tokenizer, data.captions).T
    out = {f"i2t_r@{k}": v for k, v in recall_at_k(sim, ks).items()}
    out |= {f"t2i_r@{k}": v for k, v in recall_at_k(sim.T, ks).items()}
    return out
