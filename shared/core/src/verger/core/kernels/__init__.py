"""Fused ops for transformer LMs, each a folder ``<op>/{reference.py, triton.py, __init__.py}``.

``reference.py`` is the pure-torch specification, ``triton.py`` the kernel, ``__init__.py`` the
autograd Function and the dispatcher (Triton on CUDA, the best pure-torch path elsewhere;
force one with ``backend="triton"|"torch"``). Inputs are validated: wrong shapes, dtypes,
devices or non-contiguous tensors raise ``ValueError``/``TypeError`` naming the argument.
"""

from verger.core.kernels._common import (
    BACKENDS,
    TritonUnavailableError,
    interpreter_on,
    next_power_of_2,
    pick_backend,
    require_triton,
    triton_available,
    triton_unusable,
    use_backend,
)
from verger.core.kernels.linear_cross_entropy import (
    auto_chunk_size,
    linear_cross_entropy,
    linear_cross_entropy_reference,
)
from verger.core.kernels.rms_norm import rms_norm, rms_norm_reference
from verger.core.kernels.rotary import apply_rotary_emb, rotary_reference, rotary_tables
from verger.core.kernels.swiglu import swiglu, swiglu_reference

__all__ = [
    "BACKENDS",
    "TritonUnavailableError",
    "apply_rotary_emb",
    "auto_chunk_size",
    "interpreter_on",
    "linear_cross_entropy",
    "linear_cross_entropy_reference",
    "next_power_of_2",
    "pick_backend",
    "require_triton",
    "rms_norm",
    "rms_norm_reference",
    "rotary_reference",
    "rotary_tables",
    "swiglu",
    "swiglu_reference",
    "triton_available",
    "triton_unusable",
    "use_backend",
]
