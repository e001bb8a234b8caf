"""Export a QAT model with real low-bit weights: packed integer codes plus scales.

``convert(model)`` replaces each fake-quantized layer by a module that stores its weight as
packed codes (:mod:`.packing`) and scales, and dequantizes them in its forward pass with
the same formula fake quantization uses, so the converted model computes exactly what the
QAT model computed. ``save_quantized`` / ``load_quantized`` write and read it as
``config.json`` + ``quantization.json`` + ``model.safetensors``.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save
from torch import nn
from torch.nn.utils import parametrize

from verger.core.files import atomic_directory
from verger.core.nn import TransformerConfig, TransformerLM
from verger.qat_scaling.config import SCALE_DTYPES, QuantConfig, storage_bits
from verger.qat_scaling.ops.fake_quant import dequantize_codes, level_spec
from verger.qat_scaling.packing import pack_codes, packed_size, unpack_codes
from verger.qat_scaling.prepare import QAT_CONFIG_ATTR, QATLinear, fake_quantizers
from verger.qat_scaling.quantizer import WeightFakeQuantizer

FORMAT_VERSION = 1
QUANT_NAME = "quantization.json"
CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"


class QuantizedWeight(nn.Module):
    """A ``[rows, cols]`` weight stored as packed codes (buffer ``packed``, uint8) and
    scales (buffer ``scale``); ``weight`` dequantizes it (fp32)."""

    packed: torch.Tensor
    scale: torch.Tensor

    def __init__(self, shape: tuple[int, int], config: QuantConfig, device: Any = None) -> None:
        super().__init__()
        rows, cols = shape
        self.shape = (rows, cols)
        self.config = config
        self.spec = level_spec(config.bits, str(config.scheme))
        self.bits = storage_bits(config.bits)
        self.group_size = config.group_size or cols
        dtype = SCALE_DTYPES[config.scale_dtype]
        self.register_buffer(
            "packed",
            torch.zeros(packed_size(rows * cols, self.bits), dtype=torch.uint8, device=device),
        )
        self.register_buffer(
            "scale", torch.ones(rows, cols // self.group_size, dtype=dtype, device=device)
        )

    @classmethod
    def from_quantizer(
        cls, quantizer: WeightFakeQuantizer, weight: torch.Tensor
    ) -> QuantizedWeight:
        out = cls(quantizer.shape, quantizer.config, device=weight.device)
        codes, scale = quantizer.quantize(weight)
        out.packed.copy_(pack_codes(codes.reshape(-1), out.bits))
        out.scale.copy_(scale)
        return out

    @property
    def weight(self) -> torch.Tensor:
        rows, cols = self.shape
        codes = unpack_codes(self.packed, self.bits, rows * cols)
        k = codes.float().view(-1, self.group_size) + self.spec.code_min
        w = dequantize_codes(k, self.scale.float().reshape(-1, 1), self.spec)
        return w.view(rows, cols)

    def storage_bytes(self) -> int:
        return self.packed.numel() + self.scale.numel() * self.scale.element_size()

    def extra_repr(self) -> str:
        return f"shape={self.shape}, bits={self.config.bits}, group={self.group_size}"


class QuantizedLinear(nn.Module):
    """A linear layer with a :class:`QuantizedWeight`; ``weight`` is the dequantized matrix."""

    def __init__(self, qweight: QuantizedWeight, bias: torch.Tensor | None = None) -> None:
        super().__init__()
        self.qweight = qweight
        self.out_features, self.in_features = qweight.shape
        self.bias = nn.Parameter(bias.detach().clone()) if bias is not None else None

    @property
    def weight(self) -> torch.Tensor:
        return self.qweight.weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight.to(x.dtype), self.bias)


class QuantizedEmbedding(nn.Module):
    """An embedding table stored as a :class:`QuantizedWeight` (one scale set per row)."""

    def __init__(self, qweight: QuantizedWeight) -> None:
        super().__init__()
        self.qweight = qweight
        self.num_embeddings, self.embedding_dim = qweight.shape

    @property
    def weight(self) -> torch.Tensor:
        return self.qweight.weight

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return F.embedding(ids, self.weight)


class TiedQuantizedHead(nn.Module):
    """The LM head of a tied model: the embedding's dequantized table, stored once."""

    def __init__(self, embedding: QuantizedEmbedding) -> None:
        super().__init__()
        self.__dict__["_embedding"] = embedding  # not a child: its buffers belong to `embed`

    @property
    def weight(self) -> torch.Tensor:
        return self.__dict__["_embedding"].weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight.to(x.dtype))


def _set(model: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, module)


@torch.no_grad()
def convert(model: nn.Module) -> nn.Module:
    """Replace every fake-quantized layer of a prepared ``model`` by its packed form, in
    place; returns the model. A quantizer that was never switched on first takes its
    scales from the current weights (post-training quantization)."""
    quantizers = fake_quantizers(model)
    if not quantizers:
        raise ValueError("convert: the model has no fake quantizers; call prepare first")
    for _, q, weight in quantizers:
        if not q.enabled:
            q.initialize(weight)
    tied: dict[int, QuantizedEmbedding] = {}
    for name, module in list(model.named_modules()):
        if isinstance(module, QATLinear):
            qw = QuantizedWeight.from_quantizer(module.weight_quantizer, module.weight)
            _set(model, name, QuantizedLinear(qw, module.bias))
    for name, module in list(model.named_modules()):
        if not parametrize.is_parametrized(module, "weight"):
            continue
        plist = module.parametrizations["weight"]
        quantizer, weight = plist[0], plist.original
        if not isinstance(quantizer, WeightFakeQuantizer):
            continue
        if isinstance(module, nn.Embedding):
            new: nn.Module = QuantizedEmbedding(QuantizedWeight.from_quantizer(quantizer, weight))
            tied[id(weight)] = new  # type: ignore[assignment]
        elif id(weight) in tied:
            new = TiedQuantizedHead(tied[id(weight)])
        else:
            new = QuantizedLinear(QuantizedWeight.from_quantizer(quantizer, weight), module.bias)
        _set(model, name, new)
    return model


def storage_report(model: nn.Module) -> dict[str, int]:
    """Bytes of a converted model's quantized layers: ``packed_bytes`` (codes), ``scale_bytes``,
    ``fp32_bytes`` (the same weights in fp32) and ``quantized_weights`` (their count)."""
    packed = scales = count = 0
    for module in model.modules():
        if isinstance(module, QuantizedWeight):
            packed += module.packed.numel()
            scales += module.scale.numel() * module.scale.element_size()
            count += module.shape[0] * module.shape[1]
    if not count:
        raise ValueError("storage_report: the model has no quantized weights; call convert first")
    return {
        "packed_bytes": packed,
        "scale_bytes": scales,
        "fp32_bytes": 4 * count,
        "quantized_weights": count,
    }


def _layout(model: nn.Module) -> dict[str, dict[str, Any]]:
    layers: dict[str, dict[str, Any]] = {}
    names = {id(m): n for n, m in model.named_modules()}
    for name, module in model.named_modules():
        kind = {
            QuantizedLinear: "linear",
            QuantizedEmbedding: "embedding",
            TiedQuantizedHead: "tied_head",
        }.get(type(module))
        if kind is None:
            continue
        entry: dict[str, Any] = {"kind": kind}
        if kind == "tied_head":
            entry["tied_to"] = names[id(module.__dict__["_embedding"])]
        else:
            qw = module.qweight
            entry.update(shape=list(qw.shape), config=qw.config.to_dict())
            entry["bias"] = kind == "linear" and module.bias is not None
        layers[name] = entry
    return layers


def save_quantized(model: TransformerLM, directory: str | Path) -> Path:
    """Write a converted ``TransformerLM`` to ``directory`` atomically; returns it."""
    if not isinstance(model, TransformerLM):
        raise TypeError(f"save_quantized needs a TransformerLM, got {type(model).__name__}")
    layers = _layout(model)
    if not layers:
        raise ValueError("save_quantized: the model has no quantized layers; call convert first")
    config = getattr(model, QAT_CONFIG_ATTR, None)
    meta = {
        "format": FORMAT_VERSION,
        "quant_config": config.to_dict() if isinstance(config, QuantConfig) else None,
        "layers": layers,
    }
    state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    if model.config.tie_embeddings and "lm_head.weight" in state:
        state.pop("lm_head.weight")  # a full-precision tied head: stored once, as embed.weight
    with atomic_directory(directory) as tmp:
        (tmp / WEIGHTS_NAME).write_bytes(save(state, metadata={"format": "pt"}))
        (tmp / QUANT_NAME).write_text(json.dumps(meta, indent=2) + "\n")
        (tmp / CONFIG_NAME).write_text(json.dumps(model.config.to_dict(), indent=2) + "\n")
    return Path(directory)


def load_quantized(directory: str | Path, *, device: str | torch.device = "cpu") -> TransformerLM:
    """Rebuild a model written by :func:`save_quantized` (weights loaded strictly)."""
    src = Path(directory)
    for name in (CONFIG_NAME, QUANT_NAME, WEIGHTS_NAME):
        if not (src / name).is_file():
            raise FileNotFoundError(f"load_quantized: {src / name} does not exist")
    try:
        meta = json.loads((src / QUANT_NAME).read_text())
        config = TransformerConfig.from_dict(json.loads((src / CONFIG_NAME).read_text()))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ValueError(f"load_quantized: a JSON file in {src} is corrupt ({exc})") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT_VERSION:
        raise ValueError(f"load_quantized: {src / QUANT_NAME} has an unknown format")
    model = TransformerLM(config)
    embeddings: dict[str, QuantizedEmbedding] = {}
    layers = meta["layers"]
    for name, entry in sorted(layers.items(), key=lambda kv: kv[1]["kind"] == "tied_head"):
        if entry["kind"] == "tied_head":
            if entry.get("tied_to") not in embeddings:
                raise ValueError(f"load_quantized: {name!r} is tied to an unknown embedding")
            _set(model, name, TiedQuantizedHead(embeddings[entry["tied_to"]]))
            continue
        qw = QuantizedWeight(tuple(entry["shape"]), QuantConfig.from_dict(entry["config"]))
        if entry["kind"] == "embedding":
            embeddings[name] = QuantizedEmbedding(qw)
            _set(model, name, embeddings[name])
        else:
            bias = torch.zeros(qw.shape[0]) if entry.get("bias") else None
            _set(model, name, QuantizedLinear(qw, bias))
    state = load_file(src / WEIGHTS_NAME, device="cpu")
    missing, unexpected = model.load_state_dict(state, strict=False)
    allowed = {"lm_head.weight"} if config.tie_embeddings else set()
    if set(missing) - allowed or unexpected:
        raise ValueError(
            f"load_quantized: {src / WEIGHTS_NAME} does not match {QUANT_NAME}: missing "
            f"{sorted(set(missing) - allowed)}, unexpected {sorted(unexpected)}"
        )
    if meta.get("quant_config"):
        setattr(model, QAT_CONFIG_ATTR, QuantConfig.from_dict(meta["quant_config"]))
    return model.to(device)
