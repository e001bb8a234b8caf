"""verger-qat-scaling: compute-optimal quantization-aware training (Dremov et al., 2025).

- Fake quantizers (LSQ, ParetoQ's SEQ, sign) with ``prepare`` / ``enable_fake_quant`` /
  ``convert`` for verger-core's ``TransformerLM``; torchao config conversion.
- FP-then-QAT schedules (with an FP cooldown, or cooldown & QAT fusion).
- The scaling law (tokens per parameter byte, f*(S), the loss law with Huber fits,
  bootstrap and leave-one-out) and a planner for memory / compute budgets.
- A resumable sweep runner whose runs share their FP prefix.
"""

from verger.core import package_version
from verger.qat_scaling.analysis import mean_over_seeds, optimal_fraction_table, prediction_errors
from verger.qat_scaling.config import BITS, QuantConfig, effective_bits, storage_bits
from verger.qat_scaling.convert import (
    QuantizedEmbedding,
    QuantizedLinear,
    QuantizedWeight,
    convert,
    load_quantized,
    save_quantized,
    storage_report,
)
from verger.qat_scaling.data import DataConfig, LMData, StepBatches, load_data
from verger.qat_scaling.law import (
    PAPER_FRACTION_CONSTANT,
    FittedLaw,
    LawParams,
    fit_fraction_constant,
    fit_law,
    leave_one_out,
    load_law,
    optimal_fraction,
    predict_loss,
    save_law,
    tokens_per_parameter_byte,
)
from verger.qat_scaling.models import SIZES, build_model, model_config, quantized_parameters
from verger.qat_scaling.ops import fake_quant, fake_quant_reference, level_spec
from verger.qat_scaling.packing import pack_codes, packed_size, unpack_codes
from verger.qat_scaling.planner import Candidate, Plan, PlanError, plan
from verger.qat_scaling.prepare import (
    QATLinear,
    enable_fake_quant,
    fake_quantizers,
    prepare,
    scale_parameters,
    set_backend,
)
from verger.qat_scaling.quantizer import WeightFakeQuantizer
from verger.qat_scaling.records import RecordError, append_record, parse_records, read_records
from verger.qat_scaling.schedule import QATSchedule
from verger.qat_scaling.sweep import (
    ComputePlan,
    RunSpec,
    SweepConfig,
    SweepResult,
    compute_plan,
    run_sweep,
)
from verger.qat_scaling.torchao_compat import (
    to_torchao_fake_quantize_config,
    to_torchao_qat_config,
    torchao_available,
)
from verger.qat_scaling.training import TrainConfig, evaluate, make_optimizer

__version__ = package_version("verger-qat-scaling")

__all__ = [
    "BITS",
    "PAPER_FRACTION_CONSTANT",
    "SIZES",
    "Candidate",
    "ComputePlan",
    "DataConfig",
    "FittedLaw",
    "LMData",
    "LawParams",
    "Plan",
    "PlanError",
    "QATLinear",
    "QATSchedule",
    "QuantConfig",
    "QuantizedEmbedding",
    "QuantizedLinear",
    "QuantizedWeight",
    "RecordError",
    "RunSpec",
    "StepBatches",
    "SweepConfig",
    "SweepResult",
    "TrainConfig",
    "WeightFakeQuantizer",
    "__version__",
    "append_record",
    "build_model",
    "compute_plan",
    "convert",
    "effective_bits",
    "enable_fake_quant",
    "evaluate",
    "fake_quant",
    "fake_quant_reference",
    "fake_quantizers",
    "fit_fraction_constant",
    "fit_law",
    "leave_one_out",
    "level_spec",
    "load_data",
    "load_law",
    "load_quantized",
    "make_optimizer",
    "mean_over_seeds",
    "model_config",
    "optimal_fraction",
    "optimal_fraction_table",
    "pack_codes",
    "packed_size",
    "parse_records",
    "plan",
    "predict_loss",
    "prediction_errors",
    "prepare",
    "quantized_parameters",
    "read_records",
    "run_sweep",
    "save_law",
    "save_quantized",
    "scale_parameters",
    "set_backend",
    "storage_bits",
    "storage_report",
    "to_torchao_fake_quantize_config",
    "to_torchao_qat_config",
    "tokens_per_parameter_byte",
    "torchao_available",
    "unpack_codes",
]
