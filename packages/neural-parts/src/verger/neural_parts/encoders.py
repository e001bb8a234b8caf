"""Shape encoders: input -> feature F ``[B, feature_dim]``.

- :class:`PointNetEncoder` (default): surface point cloud ``[B, N, 3]``; shared per-point
  MLPs with a max-pooled context fed back to every point, then a max pool. Order-invariant.
- :class:`VoxelEncoder`: occupancy grid ``[B, R, R, R]`` through torchvision's R3D-18.
- :class:`ImageEncoder`: depth image ``[B, 1 or 3, H, W]`` through torchvision's ResNet-18
  with frozen BatchNorm (as the paper's image encoder); no pretrained weights are loaded, so
  nothing is downloaded (torchvision is the optional ``vision`` extra).
"""

from __future__ import annotations

import torch
from torch import nn

from verger.neural_parts.checks import points
from verger.neural_parts.config import ModelConfig


class PointNetEncoder(nn.Module):
    """Two-stage PointNet: per-point features, concatenated with their max pool, pooled again."""

    def __init__(self, feature_dim: int, hidden: int = 128) -> None:
        super().__init__()
        self.local = nn.Sequential(
            nn.Linear(3, hidden), nn.ReLU(), nn.Linear(hidden, hidden), nn.ReLU()
        )
        self.context = nn.Sequential(
            nn.Linear(2 * hidden, hidden), nn.ReLU(), nn.Linear(hidden, 2 * hidden)
        )
        self.out = nn.Sequential(nn.ReLU(), nn.Linear(2 * hidden, feature_dim))

    def forward(self, cloud: torch.Tensor) -> torch.Tensor:
        points("point cloud", cloud, batched=True)
        h = self.local(cloud)
        pooled = h.max(dim=1, keepdim=True).values.expand_as(h)
        h = self.context(torch.cat([h, pooled], -1))
        return self.out(h.max(dim=1).values)


class RunningStandardize(nn.Module):
    """Standardise features with their running mean and variance over the shapes seen.

    Why: a fresh encoder's feature is a large shape-independent part plus a small
    shape-dependent one (for PointNet on unit-cube shapes, the spread across shapes is ~3 %
    of the feature's size), so the heads first see one condition for every input and learn
    the mean shape. Dividing the shape-to-shape variation by its own spread makes it O(1)
    from the first steps. The statistics are running ones (never the batch's own), so the
    layer works at batch size 1 and gives the same function in training and evaluation;
    no gradient flows through them.

    In training, each call first folds the batch into the statistics (a cumulative mean for
    the first ``1 / momentum`` samples, then an exponential moving average), then
    standardises with them.
    """

    mean: torch.Tensor
    var: torch.Tensor
    count: torch.Tensor

    def __init__(self, dim: int, *, momentum: float = 0.01, eps: float = 1e-10) -> None:
        super().__init__()
        if not 0 < momentum <= 1:
            raise ValueError(f"momentum={momentum!r} must be in (0, 1]")
        self.momentum, self.eps = float(momentum), float(eps)
        self.register_buffer("mean", torch.zeros(dim))
        self.register_buffer("var", torch.ones(dim))
        self.register_buffer("count", torch.zeros((), dtype=torch.long))

    @torch.no_grad()
    def _update(self, x: torch.Tensor) -> None:
        for row in x.detach():  # one sample at a time: exact cumulative mean and variance
            n = int(self.count) + 1
            w = max(self.momentum, 1.0 / n)
            delta = row.to(self.mean.dtype) - self.mean
            self.mean += w * delta
            self.var.mul_(1 - w).add_(w * (1 - w) * delta.square())  # 0 after the first
            self.count += 1

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.training:
            self._update(x)
        return (x - self.mean) / (self.var + self.eps).sqrt()


def _torchvision():  # type: ignore[no-untyped-def]
    try:
        import torchvision
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise ImportError(
            "the voxel and image encoders need torchvision: pip install 'verger-neural-parts[vision]'"
        ) from exc
    return torchvision


class VoxelEncoder(nn.Module):
    """R3D-18 (3-D ResNet) on an occupancy grid, the grid repeated on the 3 input channels."""

    def __init__(self, feature_dim: int, resolution: int) -> None:
        super().__init__()
        self.resolution = resolution
        self.net = _torchvision().models.video.r3d_18(weights=None, num_classes=feature_dim)

    def forward(self, voxels: torch.Tensor) -> torch.Tensor:
        r = self.resolution
        if voxels.dim() != 4 or tuple(voxels.shape[1:]) != (r, r, r):
            raise ValueError(f"voxels must have shape [B, {r}, {r}, {r}], got {list(voxels.shape)}")
        if voxels.shape[0] == 0:
            raise ValueError("voxels is an empty batch")
        x = voxels.to(next(self.parameters()).dtype).unsqueeze(1).expand(-1, 3, -1, -1, -1)
        return self.net(x)


class ImageEncoder(nn.Module):
    """ResNet-18 with frozen BatchNorm on a depth image (1 channel repeated to 3)."""

    def __init__(self, feature_dim: int, size: int) -> None:
        super().__init__()
        tv = _torchvision()
        self.size = size
        self.net = tv.models.resnet18(
            weights=None, num_classes=feature_dim, norm_layer=tv.ops.misc.FrozenBatchNorm2d
        )

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        if image.dim() != 4 or image.shape[1] not in (1, 3) or image.shape[0] == 0:
            raise ValueError(
                f"image must have shape [B, 1|3, H, W], B >= 1; got {list(image.shape)}"
            )
        if image.shape[1] == 1:
            image = image.expand(-1, 3, -1, -1)
        return self.net(image)


def build_encoder(config: ModelConfig) -> nn.Module:
    """The encoder ``config.encoder`` names."""
    if config.encoder == "pointnet":
        return PointNetEncoder(config.feature_dim, config.pointnet_hidden)
    if config.encoder == "voxel":
        return VoxelEncoder(config.feature_dim, config.voxel_resolution)
    return ImageEncoder(config.feature_dim, config.image_size)
