import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))  # for `import _helpers`

torch.set_num_threads(1)  # small ops on small shared machines: threads only contend


@pytest.fixture
def tiny_config():
    from verger.neural_parts import ModelConfig

    return ModelConfig(
        n_primitives=3,
        feature_dim=16,
        embedding_dim=8,
        hidden=32,
        projection_dim=16,
        head_hidden=32,
        pointnet_hidden=32,
    )
