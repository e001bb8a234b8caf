"""Analytic training FLOPs of one worker's inner step under a subset plan.

Convention of ``torch.utils.flop_counter`` (matmuls only, 2 per multiply-add). Per token, a
matmul with an n-element weight costs 2n forward, 2n for the input gradient (only when
something trainable lies upstream of it) and 2n for the weight gradient (only for its trained
coordinates). Softmax attention adds 4·T·d forward per layer (QK^T and PV over the full T x T
matrix, as the FLOP counter counts SDPA) and twice that backward. So a worker training a
fraction f of the matmul weights costs about (2 + 2 + 2f)·N per token instead of 6·N.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from verger.sparse_diloco.partial import PartialLinear
from verger.sparse_diloco.subset import SubsetPlan


@dataclass(frozen=True)
class StepFlops:
    forward: int
    input_grad: int
    weight_grad: int

    @property
    def total(self) -> int:
        return self.forward + self.input_grad + self.weight_grad


PARALLEL = ({"q_proj", "k_proj", "v_proj"}, {"w_gate", "w_up"})


def _ops(model: nn.Module, seq_len: int) -> list[tuple[str | None, int, set[str]]]:
    """Matmul ops in forward order: (weight name or None, forward FLOPs/token, upstream names).

    ``upstream`` is the set of parameter names used strictly before the op.
    """
    names = {id(p): n for n, p in model.named_parameters()}
    ops: list[tuple[str | None, int, set[str]]] = []
    seen: set[str] = set()
    config = getattr(model, "config", None)
    branch_inputs: dict[tuple[str, int], set[str]] = {}
    for module_name, module in model.named_modules():
        own = {names[id(p)] for p in module.parameters(recurse=False) if id(p) in names}
        if isinstance(module, nn.Linear | PartialLinear):
            weight = module.weight
            name = names.get(id(weight))
            if name is None:  # a PartialLinear's weight is a buffer: find it by its position
                name = next(n for n, p in model.named_buffers() if p is weight)
            if config is not None and name.endswith("o_proj.weight"):
                # attention scores sit between the q/k/v projections and o_proj
                ops.append((None, 4 * seq_len * config.d_model, set(seen)))
            parent, _, child = module_name.rpartition(".")
            group = next((i for i, g in enumerate(PARALLEL) if child in g), None)
            # siblings reading the same input (q/k/v, gate/up) share the first one's upstream
            upstream = (
                branch_inputs.setdefault((parent, group), set(seen))
                if group is not None
                else set(seen)
            )
            ops.append((name, 2 * module.in_features * module.out_features, upstream))
            seen.add(name)
        seen |= own
    return ops


def step_flops(
    model: nn.Module,
    plan: SubsetPlan,
    worker: int,
    *,
    batch_size: int,
    seq_len: int,
    attention_scores: bool = True,
) -> StepFlops:
    """FLOPs of one forward+backward of ``worker`` on ``batch_size`` x ``seq_len`` tokens.

    ``model`` is the global (unsliced) model; the plan says what the worker trains.
    ``attention_scores=False`` leaves out the SDPA matmuls (``torch.utils.flop_counter``
    counts none for the CPU SDPA kernels before torch 2.15).
    """
    tokens = batch_size * seq_len
    trained = {n for n in plan.names if plan.selection(worker, n) is not None}
    fwd = inp = wgt = 0
    for name, flops, upstream in _ops(model, seq_len):
        fwd += flops
        needs_input_grad = bool(upstream & trained)
        if name is None:  # attention scores: two backward matmuls per forward matmul
            if not attention_scores:
                fwd -= flops
                continue
            inp += 2 * flops if needs_input_grad else 0
            continue
        inp += flops if needs_input_grad else 0
        sel = plan.selection(worker, name)
        if sel is not None:
            full = plan.shapes[name]
            wgt = wgt + flops * sel.numel(full) // max(1, full.numel())
    return StepFlops(forward=fwd * tokens, input_grad=inp * tokens, weight_grad=wgt * tokens)
