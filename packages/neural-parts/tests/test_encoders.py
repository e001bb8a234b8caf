"""Encoders: point cloud (order-invariant), voxel and image backbones from torchvision."""

import numpy as np
import pytest
import torch

from verger.neural_parts import ModelConfig, NeuralParts, SampleConfig
from verger.neural_parts.data.batches import BatchStream
from verger.neural_parts.data.samples import SampleSpec, depth_image
from verger.neural_parts.data.sets import procedural_shapes
from verger.neural_parts.encoders import PointNetEncoder

SMALL = dict(
    n_primitives=2, feature_dim=16, embedding_dim=8, hidden=8, projection_dim=8, head_hidden=8
)


def test_pointnet_is_order_invariant():
    torch.manual_seed(0)
    enc = PointNetEncoder(12, hidden=16)
    cloud = torch.rand(2, 50, 3)
    perm = torch.randperm(50)
    assert torch.allclose(enc(cloud), enc(cloud[:, perm]), atol=1e-6)
    assert not torch.allclose(enc(cloud)[0], enc(cloud)[1])


# R3D-18 has 33M parameters: initialising them takes ~10-50 s on a small shared CPU
@pytest.mark.parametrize("encoder", [pytest.param("voxel", marks=pytest.mark.slow), "image"])
def test_torchvision_encoders_condition_every_primitive(encoder, tmp_path):
    pytest.importorskip("torchvision")
    config = ModelConfig(encoder=encoder, voxel_resolution=8, image_size=32, **SMALL)
    model = NeuralParts(config).eval()
    shapes = procedural_shapes(
        2,
        seed=0,
        spec=SampleSpec(n_surface=400, n_volume=400, voxel_resolution=8),
        cache_dir=tmp_path,
        show_progress=False,
    )
    stream = BatchStream(
        shapes,
        samples=SampleConfig(n_surface=8, n_volume=8, n_sphere=8, n_input=8),
        batch_size=2,
        encoder=encoder,
        image_size=32,
    )
    batch = stream.batch(0)
    expected = (2, 8, 8, 8) if encoder == "voxel" else (2, 1, 32, 32)
    assert tuple(batch.inputs.shape) == expected
    cond = model(batch.inputs)
    assert cond.shape == (2, 2, 24)
    # the two shapes differ, so their features do; the embeddings tell the parts apart
    assert not torch.allclose(cond[0, 0, :16], cond[1, 0, :16])
    assert not torch.allclose(cond[0, 0], cond[0, 1])
    with pytest.raises(ValueError, match="shape"):
        model(batch.inputs[..., :4] if encoder == "voxel" else torch.zeros(2, 2, 32, 32))


def test_depth_image_sees_the_nearest_surface():
    # two parallel squares: the one nearer the camera must win every shared pixel
    g = np.stack(np.meshgrid(np.linspace(-0.2, 0.2, 60), np.linspace(-0.2, 0.2, 60)), -1).reshape(
        -1, 2
    )
    near = np.c_[g, np.full(len(g), 0.3)]
    far = np.c_[g, np.full(len(g), -0.3)]
    img_near = depth_image(near, 32, 0.55)
    img_both = depth_image(np.r_[far, near], 32, 0.55)
    covered = img_near > 0
    assert covered.sum() > 20
    np.testing.assert_allclose(
        img_both[covered], np.maximum(img_near, depth_image(far, 32, 0.55))[covered]
    )
