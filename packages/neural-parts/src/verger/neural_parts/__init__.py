"""verger-neural-parts: 3D shape abstraction with invertible-network primitives.

A shape is the union of a few primitives; each is a sphere deformed by a conditional
invertible network (Neural Parts, Paschalidou et al., CVPR 2021), so one network gives an
implicit surface (g_m(x) = ||φ^-1(x; C_m)|| - r) and a watertight mesh (a triangulated sphere
pushed forward). The superquadric baseline shares the encoder and embeddings.
"""

from verger.core import package_version
from verger.neural_parts.config import LossConfig, ModelConfig, SampleConfig
from verger.neural_parts.data.batches import Batch, BatchStream
from verger.neural_parts.data.meshfiles import (
    MeshFileError,
    NotWatertightError,
    embedded_mesh_paths,
    load_mesh,
    mesh_samples,
    shapenet_models,
)
from verger.neural_parts.data.procedural import ProceduralConfig
from verger.neural_parts.data.samples import SampleSpec, ShapeSamples
from verger.neural_parts.data.sets import mesh_shapes, procedural_parts, procedural_shapes
from verger.neural_parts.data.winding import winding_numbers
from verger.neural_parts.encoders import ImageEncoder, PointNetEncoder, VoxelEncoder
from verger.neural_parts.inn import ConditionalINN, CouplingLayer
from verger.neural_parts.losses import (
    LossTerms,
    coverage_loss,
    neural_parts_loss,
    normal_loss,
    occupancy_loss,
    overlap_loss,
    reconstruction_loss,
)
from verger.neural_parts.mesh import PartMeshes, export_mesh, extract_meshes
from verger.neural_parts.metrics import (
    chamfer_l1,
    evaluate_shapes,
    normal_consistency,
    volumetric_iou,
)
from verger.neural_parts.model import NeuralParts
from verger.neural_parts.primitives import INNPrimitives, PrimitiveFamily
from verger.neural_parts.render import render_panels
from verger.neural_parts.superquadric import SuperquadricPrimitives
from verger.neural_parts.train import TrainConfig, TrainResult, train

__version__ = package_version("verger-neural-parts")

__all__ = [
    "Batch",
    "BatchStream",
    "ConditionalINN",
    "CouplingLayer",
    "INNPrimitives",
    "ImageEncoder",
    "LossConfig",
    "LossTerms",
    "MeshFileError",
    "ModelConfig",
    "NeuralParts",
    "NotWatertightError",
    "PartMeshes",
    "PointNetEncoder",
    "PrimitiveFamily",
    "ProceduralConfig",
    "SampleConfig",
    "SampleSpec",
    "ShapeSamples",
    "SuperquadricPrimitives",
    "TrainConfig",
    "TrainResult",
    "VoxelEncoder",
    "__version__",
    "chamfer_l1",
    "coverage_loss",
    "embedded_mesh_paths",
    "evaluate_shapes",
    "export_mesh",
    "extract_meshes",
    "load_mesh",
    "mesh_samples",
    "mesh_shapes",
    "neural_parts_loss",
    "normal_consistency",
    "normal_loss",
    "occupancy_loss",
    "overlap_loss",
    "procedural_parts",
    "procedural_shapes",
    "reconstruction_loss",
    "render_panels",
    "shapenet_models",
    "train",
    "volumetric_iou",
    "winding_numbers",
]
