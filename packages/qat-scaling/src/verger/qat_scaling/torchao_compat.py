"""torchao, the peer: convert a :class:`QuantConfig` to torchao's QAT configs.

Both libraries support symmetric integer weight fake quantization with one scale per output
channel or per group (our ``lsq`` scheme at 2-8 bits; torchao's ``IntxFakeQuantizeConfig``
with ``torch.int2`` ... ``torch.int8``). With ``scale_init="torchao"`` our scales start
from torchao's rule, max|w| / ((Qp - Qn) / 2), and the forward passes agree bit for bit
(``tests/test_torchao.py``); ``learned_scale=False`` is torchao's default dynamic mode
(scales recomputed from the weights at every step), ``True`` its range learning.
ParetoQ's ``seq`` and ``sign`` quantizers have no torchao equivalent.

Install with ``pip install "verger-qat-scaling[torchao]"`` (torchao needs numpy).
"""

from __future__ import annotations

import importlib.util
from typing import Any

import torch

from verger.qat_scaling.config import SCALE_DTYPES, QuantConfig


def torchao_available() -> bool:
    return importlib.util.find_spec("torchao") is not None


def _require() -> None:
    if not torchao_available():
        raise ImportError(
            "torchao is not installed: pip install 'verger-qat-scaling[torchao]' (torchao>=0.18)"
        )


def _int_dtype(bits: int) -> torch.dtype:
    return torch.int8 if bits == 8 else getattr(torch, f"int{bits}")


def to_torchao_fake_quantize_config(config: QuantConfig) -> Any:
    """torchao's ``IntxFakeQuantizeConfig`` for the weights of ``config``.

    Raises ``ValueError`` for what torchao cannot express: the ``seq`` / ``sign`` schemes,
    ternary, and scale initializations other than ``"torchao"``.
    """
    if not isinstance(config, QuantConfig):
        raise TypeError(f"config must be a QuantConfig, got {type(config).__name__}")
    if config.scheme != "lsq" or not isinstance(config.bits, int):
        raise ValueError(
            f"torchao has no equivalent of the {config.scheme!r} quantizer at bits={config.bits!r}; "
            "only the lsq scheme (2-8 bits) converts"
        )
    if config.scale_init != "torchao":
        raise ValueError(
            f"scale_init={config.scale_init!r}: torchao sets scales by max|w| / ((Qp - Qn) / 2); "
            "use scale_init='torchao' for a config that converts"
        )
    _require()
    from torchao.quantization.qat import IntxFakeQuantizeConfig

    granularity: dict[str, Any] = (
        {"granularity": "per_channel"}
        if config.group_size is None
        else {"group_size": config.group_size}
    )
    return IntxFakeQuantizeConfig(
        _int_dtype(config.bits),
        is_symmetric=True,
        scale_precision=SCALE_DTYPES[config.scale_dtype],
        is_dynamic=not config.learned_scale,
        range_learning=config.learned_scale,
        **granularity,
    )


def to_torchao_qat_config(config: QuantConfig, step: str = "prepare") -> Any:
    """``torchao.quantization.qat.QATConfig`` (weights only) for ``quantize_(model, ...)``.

    torchao applies it to every ``nn.Linear`` its ``filter_fn`` selects; pass
    ``filter_fn=lambda m, name: name != "lm_head"`` to keep the head as :func:`prepare` does.
    """
    if step not in ("prepare", "convert"):
        raise ValueError(f"step={step!r} must be 'prepare' or 'convert'")
    weight_config = to_torchao_fake_quantize_config(config)
    from torchao.quantization.qat import QATConfig

    return QATConfig(weight_config=weight_config, step=step)


def torchao_fake_quantize(weight: torch.Tensor, config: QuantConfig) -> torch.Tensor:
    """torchao's fake quantization of ``weight`` [rows, cols] under ``config`` (its scales
    computed from this weight, as its dynamic mode and range-learning initialization do)."""
    fq_config = to_torchao_fake_quantize_config(config)
    from torchao.quantization.qat.fake_quantize_config import IntxFakeQuantizeConfig
    from torchao.quantization.qat.fake_quantizer import IntxFakeQuantizer

    dynamic = IntxFakeQuantizeConfig(
        fq_config.dtype,
        fq_config.granularity,
        fq_config.mapping_type,
        scale_precision=fq_config.scale_precision,
    )
    with torch.no_grad():
        return IntxFakeQuantizer(dynamic)(weight)
