"""Helpers shared by the tests (imported as a plain module: conftest puts this folder on sys.path)."""

import torch


def randomize(module: torch.nn.Module, std: float = 0.3, seed: int = 0) -> torch.nn.Module:
    """Give the zero-initialised coupling outputs random weights (a non-trivial deformation)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            if ".out." in name and ("s_net" in name or "t_net" in name):
                p.copy_(torch.randn(p.shape, generator=gen, dtype=p.dtype) * std)
    return module


def ddp_grads_match_local_average(cache_dir: str) -> dict:
    """One DDP step on 2 ranks: the averaged gradient equals the mean of per-rank gradients."""
    import copy

    from verger.core.distributed import all_gather_object, get_rank, get_world_size
    from verger.neural_parts import LossConfig, ModelConfig, NeuralParts, SampleConfig
    from verger.neural_parts.data.batches import BatchStream
    from verger.neural_parts.data.samples import SampleSpec
    from verger.neural_parts.data.sets import procedural_shapes
    from verger.neural_parts.train import LossModule, TrainConfig, train

    rank, world_size = get_rank(), get_world_size()
    torch.manual_seed(0)
    config = ModelConfig(
        n_primitives=2,
        feature_dim=8,
        embedding_dim=8,
        hidden=16,
        projection_dim=8,
        head_hidden=16,
        pointnet_hidden=16,
    )
    model = NeuralParts(config)
    shapes = procedural_shapes(
        2,
        seed=0,
        spec=SampleSpec(n_surface=500, n_volume=500, voxel_resolution=0),
        cache_dir=cache_dir,
        show_progress=False,
    )
    samples = SampleConfig(n_surface=40, n_volume=64, n_sphere=20, n_input=32)
    # the local gradient of this rank's first batch, on a copy
    local = LossModule(copy.deepcopy(model), LossConfig())
    batch = BatchStream(shapes, samples=samples, batch_size=1, seed=0, rank=rank).batch(0)
    local(batch)[0].backward()
    grads = [p.grad.clone() for p in local.model.parameters()]
    everyone = all_gather_object(grads)
    expected = [sum(g[i] for g in everyone) / world_size for i in range(len(grads))]
    before = [p.detach().clone() for p in model.parameters()]
    lr = 1e-3
    train(
        model,
        shapes,
        config=TrainConfig(steps=1, batch_size=1, lr=lr, optimizer="adam", grad_clip=None),
        samples=samples,
        show_progress=False,
    )
    # Adam's first step moves each coordinate by exactly lr * g / (|g| + eps)
    agree = []
    for p, b, e in zip(model.parameters(), before, expected):
        moved = (b - p.detach()) / lr
        agree.append(bool(torch.allclose(moved, e / (e.abs() + 1e-8), atol=2e-4)))
    params = [p.detach().clone() for p in model.parameters()]
    return {"agree": all(agree), "params": params}
