"""Side-by-side measurements for every package's ``bench`` command.

- :func:`compare`: interleaved A/B timing after warm-up -> ``{name: Timing}`` (medians, IQR).
- :func:`measure_peak_memory`: CUDA allocator peak on GPU; tracked tensor-storage peak on CPU.
- :func:`count_flops`: ``torch.utils.flop_counter`` total for one call.
- :class:`Report`: ``metrics.json`` + ``report.md`` + PNG plots, written atomically.
- :func:`add_cli_args`: the shared ``--out`` / ``--quick`` / ``--device`` options;
  :func:`positive_int`, an argparse type for counts.
"""

from verger.core.bench.cli import add_cli_args, positive_int
from verger.core.bench.flops import count_flops
from verger.core.bench.memory import TensorMemoryTracker, measure_peak_memory
from verger.core.bench.report import Report, markdown_table, new_figure
from verger.core.bench.timing import Timing, compare, speedups, time_call

__all__ = [
    "Report",
    "TensorMemoryTracker",
    "Timing",
    "add_cli_args",
    "compare",
    "count_flops",
    "markdown_table",
    "measure_peak_memory",
    "new_figure",
    "positive_int",
    "speedups",
    "time_call",
]
