"""Side-by-side measurements for every package's ``bench`` command.

- :func:`compare`: interleaved A/B timing after warm-up -> ``{name: Timing}`` (medians, IQR).
- :func:`measure_peak_memory`: CUDA allocator peak on GPU; tracked tensor-storage peak on CPU.
- :func:`count_flops`: ``torch.utils.flop_counter`` total for one call.
- :class:`Report`: ``metrics.json`` + ``report.md`` + PNG plots, written atomically.

Command lines are :mod:`verger.core.cli`'s (the package contract).
"""

from verger.core.bench.flops import count_flops
from verger.core.bench.memory import TensorMemoryTracker, measure_peak_memory
from verger.core.bench.report import Report, markdown_table, new_figure
from verger.core.bench.timing import Timing, compare, speedups, time_call

__all__ = [
    "Report",
    "TensorMemoryTracker",
    "Timing",
    "compare",
    "count_flops",
    "markdown_table",
    "measure_peak_memory",
    "new_figure",
    "speedups",
    "time_call",
]
