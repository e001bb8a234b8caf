"""A worker's model: the full network for the forward pass, gradients only for its subset.

Frozen whole tensors get ``requires_grad=False``: autograd then skips their weight-gradient
matmul and no ``.grad`` is ever allocated. A sliced ``nn.Linear`` becomes a `PartialLinear`:
the full weight is a buffer, the trained range is a ``Parameter`` that is a *view* of it (the
optimizer's in-place updates land in the weight the forward pass reads), and a custom backward
computes the input gradient through the whole weight but the weight gradient only for the
slice, so the frozen part costs no weight-gradient FLOPs and no gradient memory.

``standalone=True`` is for engines that re-home parameters (DeepSpeed ZeRO flattens every
Parameter into its own buffers, which breaks a view): the slice is then a separate Parameter,
copied into the full weight at each forward pass and merged back by `merge_slices`.
"""

from __future__ import annotations

import copy
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from verger.sparse_diloco.subset import Selection, SubsetPlan


class _SlicedLinearFn(torch.autograd.Function):
    @staticmethod
    def forward(
        ctx: Any,
        x: torch.Tensor,
        trainable: torch.Tensor,
        weight: torch.Tensor,
        bias: torch.Tensor | None,
        dim: int,
        start: int,
        stop: int,
    ) -> torch.Tensor:
        del trainable  # a view of ``weight``: its values are already in the product below
        # A column slice needs only the matching input features for its weight gradient:
        # keeping just those lets the rest of the (hidden-sized) input be freed.
        saved = x if dim == 0 else x[..., start:stop].contiguous()
        ctx.save_for_backward(saved, weight)
        ctx.slice = (dim, start, stop)
        ctx.has_bias = bias is not None
        return F.linear(x, weight, bias)

    @staticmethod
    def backward(ctx: Any, grad_out: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        saved, weight = ctx.saved_tensors
        dim, start, stop = ctx.slice
        grad_x = grad_out @ weight if ctx.needs_input_grad[0] else None
        g2 = grad_out.reshape(-1, grad_out.shape[-1])
        x2 = saved.reshape(-1, saved.shape[-1])
        # rows = output features; columns = input features (only those were saved)
        grad_w = (g2[:, start:stop] if dim == 0 else g2).t() @ x2
        grad_b = g2.sum(0) if ctx.has_bias and ctx.needs_input_grad[3] else None
        return grad_x, grad_w, None, grad_b, None, None, None


class PartialLinear(nn.Module):
    """An ``nn.Linear`` that trains only ``[start, stop)`` of its weight along ``dim``.

    ``weight`` is a buffer holding the full matrix (state-dict compatible with ``nn.Linear``);
    ``trainable`` is the Parameter view of the slice. The bias, if any, stays a Parameter whose
    ``requires_grad`` the plan sets like any whole tensor.
    """

    weight: torch.Tensor

    def __init__(
        self, linear: nn.Linear, selection: Selection, *, standalone: bool = False
    ) -> None:
        super().__init__()
        if selection.dim not in (0, 1):
            raise ValueError(f"PartialLinear needs a slice along dim 0 or 1, got {selection}")
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.register_buffer("weight", linear.weight.detach())
        self.bias = linear.bias
        self.selection = selection
        self.standalone = standalone
        view = selection.view(self.weight)
        self.trainable = nn.Parameter(view.clone() if standalone else view)

    def merge(self) -> None:
        """Write a standalone slice into the full weight (a no-op for a view)."""
        if self.standalone:
            with torch.no_grad():
                self.selection.view(self.weight).copy_(self.trainable)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s = self.selection
        self.merge()
        return _SlicedLinearFn.apply(
            x, self.trainable, self.weight, self.bias, s.dim, s.start, s.stop
        )

    def extra_repr(self) -> str:
        s = self.selection
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, "
            f"trains dim {s.dim} [{s.start}, {s.stop})"
            + (", standalone" if self.standalone else "")
        )


def merge_slices(model: nn.Module) -> None:
    """Merge every standalone `PartialLinear` slice into its full weight."""
    for module in model.modules():
        if isinstance(module, PartialLinear):
            module.merge()


def get_tensor(model: nn.Module, name: str) -> torch.Tensor:
    """The tensor called ``name`` (a parameter or, after slicing, the full buffer)."""
    module_name, _, attr = name.rpartition(".")
    module = model.get_submodule(module_name) if module_name else model
    tensor = getattr(module, attr)
    if not isinstance(tensor, torch.Tensor):
        raise KeyError(f"{name!r} is not a tensor of the model")
    return tensor


def build_worker_model(
    model: nn.Module, plan: SubsetPlan, worker: int, *, standalone: bool = False
) -> nn.Module:
    """A copy of ``model`` that trains only ``worker``'s subset of ``plan``.

    The copy shares nothing with ``model``. Its forward pass is the full network's.
    ``standalone``: sliced weights train a separate Parameter instead of a view (`PartialLinear`).
    """
    if not 0 <= worker < plan.num_workers:
        raise ValueError(f"worker={worker} must be in [0, {plan.num_workers})")
    shapes = {n: p.shape for n, p in model.named_parameters()}
    if shapes != plan.shapes:
        wrong = sorted(
            n for n in shapes.keys() | plan.shapes.keys() if shapes.get(n) != plan.shapes.get(n)
        )
        raise ValueError(
            f"the plan does not match the model's parameters (names or shapes, e.g. {wrong[:3]})"
        )
    local = copy.deepcopy(model)
    for name in plan.names:
        sel = plan.selection(worker, name)
        if sel is None or sel.is_whole:
            get_tensor(local, name).requires_grad_(sel is not None)
            continue
        module_name, _, attr = name.rpartition(".")
        linear = local.get_submodule(module_name)
        if attr != "weight" or not isinstance(linear, nn.Linear):
            raise ValueError(f"{name!r}: only nn.Linear weights can be sliced")
        parent_name, _, child = module_name.rpartition(".")
        parent = local.get_submodule(parent_name) if parent_name else local
        setattr(parent, child, PartialLinear(linear, sel, standalone=standalone))
    return local


def trainable_parameters(model: nn.Module) -> list[nn.Parameter]:
    """The parameters an inner optimizer should hold (the worker's subset only)."""
    return [p for p in model.parameters() if p.requires_grad]
