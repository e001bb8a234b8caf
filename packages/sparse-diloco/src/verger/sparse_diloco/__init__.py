"""verger-sparse-diloco: DiLoCo and partial parameter updates for low-communication training.

Each of W workers takes H local AdamW steps on a fixed subset of the parameters (e.g. a
quarter of every MLP's hidden units) with a full forward pass; an outer Nesterov step then
averages each coordinate's pseudo-gradient over the workers that trained it. On torchft
(extra ``[torchft]``), workers are replica groups that may die and rejoin mid-run.
"""

from verger.core import package_version
from verger.sparse_diloco.compression import Codec
from verger.sparse_diloco.config import DiLoCoConfig
from verger.sparse_diloco.deepspeed_island import DeepSpeedDiLoCo
from verger.sparse_diloco.engine import BatchSource, DiLoCo, NonFiniteLossError, Worker
from verger.sparse_diloco.partial import PartialLinear, build_worker_model, trainable_parameters
from verger.sparse_diloco.reference import reference_diloco
from verger.sparse_diloco.subset import Selection, SubsetPlan
from verger.sparse_diloco.torchft_engine import (
    QuorumTimeoutError,
    TorchFTDiLoCo,
    TorchFTOptions,
)
from verger.sparse_diloco.transport import (
    LocalTransport,
    ProcessGroupTransport,
    Transport,
    WorkerLostError,
)

__version__ = package_version("verger-sparse-diloco")

__all__ = [
    "BatchSource",
    "Codec",
    "DeepSpeedDiLoCo",
    "DiLoCo",
    "DiLoCoConfig",
    "LocalTransport",
    "NonFiniteLossError",
    "PartialLinear",
    "ProcessGroupTransport",
    "QuorumTimeoutError",
    "Selection",
    "SubsetPlan",
    "TorchFTDiLoCo",
    "TorchFTOptions",
    "Transport",
    "Worker",
    "WorkerLostError",
    "__version__",
    "build_worker_model",
    "reference_diloco",
    "trainable_parameters",
]
