"""``prepare`` a model for QAT and switch fake quantization on when the schedule says so.

``prepare(model, config)`` swaps every ``nn.Linear`` of the model for a :class:`QATLinear`
(same weight and bias tensors, plus a :class:`WeightFakeQuantizer`), except the LM head and
the layers matched by ``exclude``. The token embedding and the head follow
``config.embedding_bits``: full precision by default, or 4-8 bit LSQ through a
parametrization of their ``weight`` (the core model reads ``lm_head.weight`` directly in its
fused loss, and a tied head shares the embedding's quantizer). Quantizers start off:
``enable_fake_quant(model, True)`` switches them on at any step and sets their scales from
the weights at that moment (the delayed start).
"""

from __future__ import annotations

import fnmatch
from collections.abc import Iterable

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils import parametrize

from verger.core.validation import one_of
from verger.qat_scaling.config import QuantConfig
from verger.qat_scaling.ops.fake_quant import Backend
from verger.qat_scaling.quantizer import WeightFakeQuantizer

QAT_CONFIG_ATTR = "qat_config"


class QATLinear(nn.Linear):
    """``nn.Linear`` computing with ``weight_quantizer(weight)``; built from an existing
    layer, whose parameter tensors it keeps (an optimizer built before stays valid)."""

    def __init__(self, linear: nn.Linear, config: QuantConfig) -> None:
        nn.Module.__init__(self)
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.weight = linear.weight
        self.bias = linear.bias
        self.weight_quantizer = WeightFakeQuantizer(
            (linear.out_features, linear.in_features), config, device=linear.weight.device
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight_quantizer(self.weight), self.bias)


def _check_exclude(exclude: object) -> tuple[str, ...]:
    if isinstance(exclude, str):
        return (exclude,)
    if not isinstance(exclude, Iterable) or not all(isinstance(p, str) for p in exclude):
        raise TypeError(f"exclude must be module-name patterns (strings), got {exclude!r}")
    return tuple(exclude)


def _head_names(model: nn.Module) -> set[str]:
    """The LM head: the ``lm_head`` attribute, or a Linear sharing an embedding's weight."""
    embedding_weights = {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}
    names = {"lm_head"} if isinstance(getattr(model, "lm_head", None), nn.Linear) else set()
    for name, module in model.named_modules():
        if isinstance(module, nn.Linear) and id(module.weight) in embedding_weights:
            names.add(name)
    return names


def prepare(
    model: nn.Module, config: QuantConfig, *, exclude: Iterable[str] | str = ()
) -> nn.Module:
    """Make ``model`` (a ``TransformerLM`` or any module of Linear / Embedding layers) ready
    for QAT, in place, with fake quantization off; returns it.

    ``exclude``: ``fnmatch`` patterns of module names kept in full precision
    (``"blocks.0.*"``, ``"*.w_down"``). Raises ``ValueError`` when the model is already
    prepared, nothing would be quantized, or ``config.group_size`` does not divide a layer.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    if not isinstance(config, QuantConfig):
        raise TypeError(f"config must be a QuantConfig, got {type(config).__name__}")
    patterns = _check_exclude(exclude)
    if fake_quantizers(model):
        raise ValueError("prepare: the model already has fake quantizers (prepared twice?)")
    heads = _head_names(model)

    def excluded(name: str) -> bool:
        return any(fnmatch.fnmatchcase(name, p) for p in patterns)

    swaps = [
        (name, module)
        for name, module in model.named_modules()
        if type(module) is nn.Linear and name not in heads and not excluded(name)
    ]
    for name, module in swaps:  # check every layer before changing any
        group = config.group_size
        if group is not None and module.in_features % group:
            raise ValueError(
                f"group_size={group} does not divide the {module.in_features} inputs of "
                f"layer {name!r}; pick a divisor or exclude the layer"
            )
    embed_config = config.embedding_config()
    embeds = []
    if embed_config is not None:
        for name, module in model.named_modules():
            if isinstance(module, nn.Embedding | nn.Linear) and (
                name in heads or isinstance(module, nn.Embedding)
            ):
                if excluded(name):
                    continue
                cols = module.weight.shape[1]
                group = embed_config.group_size
                if group is not None and cols % group:
                    raise ValueError(
                        f"embedding_group_size={group} does not divide the {cols} columns of "
                        f"{name!r}"
                    )
                embeds.append((name, module))
    chosen = {id(m.weight) for _, m in embeds}
    for name, module in model.named_modules():
        tied = isinstance(module, nn.Embedding | nn.Linear) and id(module.weight) in chosen
        if tied and all(module is not m for _, m in embeds):
            raise ValueError(
                f"{name!r} shares its weight with a quantized embedding or head but is excluded; "
                "a tied embedding and head are quantized together or not at all"
            )
    if not swaps and not embeds:
        raise ValueError("prepare: no layer left to quantize (check exclude)")
    for name, module in swaps:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, QATLinear(module, config))
    shared: dict[int, WeightFakeQuantizer] = {}  # one quantizer per tensor (tied weights)
    for _, module in embeds:
        assert embed_config is not None
        weight = module.weight
        quantizer = shared.get(id(weight))
        if quantizer is None:
            shape = (weight.shape[0], weight.shape[1])
            quantizer = WeightFakeQuantizer(shape, embed_config, device=weight.device)
            shared[id(weight)] = quantizer
        # unsafe: the quantizer returns the weight itself while off (no copy)
        parametrize.register_parametrization(module, "weight", quantizer, unsafe=True)
    setattr(model, QAT_CONFIG_ATTR, config)
    return model


def fake_quantizers(model: nn.Module) -> list[tuple[str, WeightFakeQuantizer, torch.Tensor]]:
    """``(module name, quantizer, full-precision weight)`` for every quantized tensor, each
    quantizer once (a tied embedding and head share one)."""
    found: dict[int, tuple[str, WeightFakeQuantizer, torch.Tensor]] = {}
    for name, module in model.named_modules():
        if isinstance(module, QATLinear):
            q, w = module.weight_quantizer, module.weight
        elif parametrize.is_parametrized(module, "weight"):
            plist = module.parametrizations["weight"]
            if not isinstance(plist[0], WeightFakeQuantizer):
                continue
            q, w = plist[0], plist.original
        else:
            continue
        found.setdefault(id(q), (name, q, w))
    return list(found.values())


def enable_fake_quant(model: nn.Module, enabled: bool = True) -> int:
    """Switch fake quantization on (or off) in every quantizer; returns how many changed.

    A quantizer switched on takes its scales from the current weights (``scale_init``), so
    QAT can start at any step. Switching off keeps the learned scales; switching on again
    re-initializes them.
    """
    if not isinstance(enabled, bool):
        raise TypeError(f"enabled must be a bool, got {enabled!r}")
    quantizers = fake_quantizers(model)
    if not quantizers:
        raise ValueError("enable_fake_quant: the model has no fake quantizers; call prepare first")
    changed = 0
    for _, q, weight in quantizers:
        if q.enabled == enabled:
            continue
        if enabled:
            q.initialize(weight)
        q.set_enabled(enabled)
        changed += 1
    return changed


def scale_parameters(model: nn.Module) -> list[nn.Parameter]:
    """The learned scales (give them their own optimizer group, without weight decay)."""
    return [q.scale for _, q, _ in fake_quantizers(model) if q.scale.requires_grad]


def set_backend(model: nn.Module, backend: Backend) -> None:
    """Route every quantizer through ``backend`` ("auto", "triton" or "torch")."""
    one_of("backend", backend, ("auto", "triton", "torch"))
    for _, q, _ in fake_quantizers(model):
        q.backend = backend
