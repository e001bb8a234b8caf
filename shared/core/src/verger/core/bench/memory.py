"""Peak memory of a call: the CUDA caching allocator on GPU, tracked tensor storage on CPU.

CPU measure (documented contract): inside a ``TorchDispatchMode`` every ATen op's outputs are
inspected; an output whose storage is neither an input's storage nor already tracked is a new
allocation of ``storage.nbytes()`` bytes, and a weak-reference finalizer on that storage
subtracts it when the storage is freed. The peak of this live sum (above what existed before
the call) is returned. It counts exactly the tensor storage the call allocates, including
autograd's saved activations and gradients, and ignores allocator caching, fragmentation and
non-tensor memory, so it is deterministic run to run (unlike process RSS) and comparable with
``torch.cuda.max_memory_allocated`` deltas on GPU.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable
from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves


class TensorMemoryTracker(TorchDispatchMode):
    """Dispatch mode that tracks live bytes of tensor storages allocated while it is active.

    Attributes ``live_bytes`` and ``peak_bytes`` are updated as ops run; storages allocated
    inside the mode are still subtracted when freed after the mode exits.
    """

    def __init__(self) -> None:
        super().__init__()
        self.live_bytes = 0
        self.peak_bytes = 0
        self._sizes: dict[int, int] = {}

    def _free(self, ptr: int) -> None:
        self.live_bytes -= self._sizes.pop(ptr, 0)

    def __torch_dispatch__(  # type: ignore[override]
        self,
        func: Any,
        types: Any,
        args: tuple[Any, ...] = (),
        kwargs: dict[str, Any] | None = None,
    ) -> Any:
        out = func(*args, **(kwargs or {}))
        inputs = {
            a.untyped_storage().data_ptr()
            for a in tree_leaves((args, kwargs))
            if isinstance(a, torch.Tensor) and a.device.type != "meta"
        }
        for t in tree_leaves(out):
            if not isinstance(t, torch.Tensor) or t.device.type == "meta":
                continue
            storage = t.untyped_storage()
            ptr = storage.data_ptr()
            if ptr == 0 or ptr in inputs or ptr in self._sizes:
                continue  # a view, an in-place result, an empty tensor, or already counted
            nbytes = storage.nbytes()
            self._sizes[ptr] = nbytes
            self.live_bytes += nbytes
            self.peak_bytes = max(self.peak_bytes, self.live_bytes)
            weakref.finalize(storage, self._free, ptr)
        return out


def measure_peak_memory(fn: Callable[[], Any], *, device: torch.device | str | None = None) -> int:
    """Peak bytes of tensor memory allocated by one call of ``fn`` (above the starting level).

    ``device`` defaults to CUDA when available, else CPU. On CUDA this is
    ``max_memory_allocated()`` minus the allocation before the call (allocator statistics);
    on CPU it is the tracked live-storage peak described in this module's docstring.
    """
    dev = torch.device(device) if device is not None else None
    if dev is None:
        dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)
        start = torch.cuda.memory_allocated(dev)
        torch.cuda.reset_peak_memory_stats(dev)
        fn()
        torch.cuda.synchronize(dev)
        return int(torch.cuda.max_memory_allocated(dev) - start)
    if dev.type != "cpu":
        raise ValueError(f"device={str(dev)!r}: peak memory is measured on 'cpu' or 'cuda' only")
    tracker = TensorMemoryTracker()
    with tracker:
        fn()
    return int(tracker.peak_bytes)
