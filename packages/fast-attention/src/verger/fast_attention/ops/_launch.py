"""Launch a compiled Triton kernel straight through its launcher.

A training step of causal linear attention at a few thousand tokens is bound by the host's
time to issue its launches, not by the GPU. ``kernel[grid](...)`` binds the arguments,
specializes each one, hashes a cache key and looks the compiled kernel up on every call; on an
H200 host that cost 28 µs for a kernel with 12 pointer arguments, against 12 µs for the
compiled launcher alone (``ci/gpu_launch_cost.py``). ``Launcher`` keeps the compiled kernel
of each specialization and calls its launcher directly afterwards.

The cache key holds everything Triton specializes on, and more: the compile-time arguments
and launch options, each int argument's exact value, each tensor's dtype and whether its
address is 16-byte aligned, and the device. The first call of each key goes through
``kernel[grid]``, which compiles (or finds) the kernel, launches it and returns it.

The direct path needs Triton >= 3.4 (its ``CompiledKernel.run`` signature and ``knobs``); on
older versions, under the interpreter (``TRITON_INTERPRET=1``: nothing is compiled) or with
``VERGER_DIRECT_LAUNCH=0`` in the environment, every call goes through ``kernel[grid]``.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from typing import Any

import torch

try:
    import triton
    from triton.runtime import driver

    _VERSION = tuple(int(p) for p in triton.__version__.split(".")[:2])
    _SUPPORTED = _VERSION >= (3, 4) and hasattr(triton, "knobs")
except ImportError:  # pragma: no cover - triton is optional at import
    _SUPPORTED = False

DIRECT = _SUPPORTED and os.environ.get("VERGER_DIRECT_LAUNCH", "1") != "0"


def _current_stream(device: torch.device) -> int:
    """The raw handle of ``device``'s current stream (what Triton launches on)."""
    return driver.active.get_current_stream(device.index)


def _specialization(args: Sequence[Any]) -> tuple[Any, ...]:
    """What Triton specializes runtime arguments on (a superset), flat: each tensor's dtype and
    16-byte alignment, each int's value, a float's type only. One inline loop: a helper call
    per argument cost more host time than the launch's own binding saves."""
    key: list[Any] = []
    for arg in args:
        if isinstance(arg, torch.Tensor):
            key += (arg.dtype, arg.data_ptr() % 16 == 0)
        elif isinstance(arg, float):
            key.append(float)
        else:
            key.append(arg)
    return tuple(key)


class Launcher:
    """``Launcher(kernel)(grid, args, meta)`` runs ``kernel[grid](*args, **meta)``.

    ``args`` are the runtime arguments in signature order; ``meta`` the compile-time ones
    (``tl.constexpr`` parameters; those left out take their defaults) and launch options
    (``num_warps``, ``num_stages``, ...). The direct path needs the compile-time parameters
    after the runtime ones in the kernel's signature, as in this package's kernels.
    """

    def __init__(self, kernel: Any, *, direct: bool | None = None):
        self.kernel = kernel
        self.direct = DIRECT if direct is None else direct
        params = list(getattr(kernel, "params", ()))
        self._constexprs = tuple((p.name, p.default) for p in params if p.is_constexpr)
        # the launcher takes the runtime arguments then the compile-time ones only when the
        # signature lists them in that order; otherwise every call binds through Triton
        first = next((i for i, p in enumerate(params) if p.is_constexpr), len(params))
        if any(not p.is_constexpr for p in params[first:]):
            self.direct = False
        self._compiled: dict[tuple[Any, ...], Any] = {}

    def __call__(self, grid: Sequence[int], args: Sequence[Any], meta: Mapping[str, Any]) -> None:
        if not self.direct:
            self.kernel[grid](*args, **meta)
            return
        tensor = next((a for a in args if isinstance(a, torch.Tensor)), None)
        if tensor is None:  # no device to launch on but the current one: let Triton bind
            self.kernel[grid](*args, **meta)
            return
        device = tensor.device
        key = (tuple(meta.items()), device, _specialization(args))
        entry = self._compiled.get(key)
        if entry is None:
            compiled = self.kernel[grid](*args, **meta)
            if compiled is not None and hasattr(compiled, "run"):  # None: the interpreter
                # The launcher takes every parameter in signature order, compile-time ones
                # included, as JITFunction.run passes them (Triton >= 3.3): their values are
                # fixed by the key, so they are gathered once.
                tail = tuple(meta.get(name, default) for name, default in self._constexprs)
                self._compiled[key] = (compiled, tail)
            return
        compiled, tail = entry
        full = (*args, *tail)
        knobs = triton.knobs.runtime
        stream = _current_stream(device)
        grid3 = (*grid, 1, 1)[:3]
        compiled.run(
            *grid3, stream, compiled.function, compiled.packed_metadata,
            compiled.launch_metadata(grid3, stream, *full),
            knobs.launch_enter_hook, knobs.launch_exit_hook, *full,
        )  # fmt: skip
