"""Linear attention ("Transformers are RNNs"): batch forms and the recurrent step.

``V'_i = φ(Q_i)ᵀ Σ_j φ(K_j) V_jᵀ / (φ(Q_i)ᵀ Σ_j φ(K_j) + eps)``, summing over all ``j``
(non-causal) or ``j ≤ i`` (causal). The causal numerator is the chunked ``causal_product``
kernel; its normalizer is a cumulative sum of φ(K), which costs O(N·D).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch

from verger.fast_attention._checks import FLOAT_DTYPES, check_eps, check_padding_mask, check_qkv
from verger.fast_attention.feature_maps import (
    EluFeatureMap,
    FeatureMap,
    compute_dtype,
    get_feature_map,
)
from verger.fast_attention.ops.causal_linear import (
    KERNEL_DTYPES,
    causal_linear,
    causal_linear_fused,
    resolve_backend,
)

__all__ = ["LinearAttentionState", "linear_attention", "linear_attention_step"]


@dataclass
class LinearAttentionState:
    """Recurrent state after ``steps`` tokens: ``s = Σ φ(k) vᵀ`` (B, H, F, Dv), ``z = Σ φ(k)``."""

    s: torch.Tensor
    z: torch.Tensor
    steps: int = 0

    def nbytes(self) -> int:
        """Memory held by the state: constant in the number of tokens seen."""
        return self.s.numel() * self.s.element_size() + self.z.numel() * self.z.element_size()


def _features(
    fm: FeatureMap, q: torch.Tensor, k: torch.Tensor, mask: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor]:
    qf = fm(q, is_query=True)
    kf = fm(k, is_query=False)
    if mask is not None:  # padded keys contribute to neither numerator nor normalizer
        kf = kf.masked_fill(mask[:, None, :, None], 0.0)
    return qf, kf


_DEFAULT_ELU: dict[int, EluFeatureMap] = {}  # per head dim (a dict: dynamo warns on lru_cache)


def _feature_map(
    spec: str | FeatureMap, head_dim: int, options: dict[str, Any], *, recurrent: bool = False
) -> FeatureMap:
    """``get_feature_map``, with the default elu+1 map built once per head dim: it holds no
    parameters or state, and an ``nn.Module`` built per call is host time in every step.
    ``recurrent``: the map must be the same in later steps, so a random one by name (a new
    draw per call) is refused."""
    if spec == "elu" and not options:
        elu = _DEFAULT_ELU.get(head_dim)
        if elu is None:
            elu = _DEFAULT_ELU[head_dim] = EluFeatureMap(head_dim)
        return elu
    try:
        fm = get_feature_map(spec, head_dim, **options)
    except TypeError as err:
        if not options:
            raise
        raise TypeError(
            f"keyword(s) {sorted(options)} are neither linear attention's own nor options of "
            f"this feature map: {err}"
        ) from None
    if recurrent and isinstance(spec, str) and fm.is_random:
        raise ValueError(
            f"feature_map={spec!r} by name draws new random features on every call, so a "
            "recurrent state would not match the next step's map; build one instance "
            f"(get_feature_map({spec!r}, head_dim)) and pass it to every call"
        )
    return fm


def _fused_backend(
    fm: FeatureMap, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, backend: str
) -> str | None:
    """The backend of ``causal_linear_fused`` that can apply φ itself, or None: the built-in
    elu+1 map, no padding mask (checked by the caller), and for Triton one 16/32-bit dtype and
    a launch that fits (the torch path takes any)."""
    if type(fm) is not EluFeatureMap or q.dtype != k.dtype:
        return None
    launch = (max(q.shape[-1], v.shape[-1]), math.prod(v.shape[:-2]))
    resolved = resolve_backend(backend, v.device, *launch, v.dtype)
    if resolved == "torch":
        return resolved
    if resolved == "triton" and v.dtype == q.dtype and v.dtype in KERNEL_DTYPES:
        return resolved
    return None


def linear_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    causal: bool = False,
    feature_map: str | FeatureMap = "elu",
    key_padding_mask: torch.Tensor | None = None,
    eps: float = 1e-6,
    return_state: bool = False,
    backend: str = "auto",
    chunk_size: int | None = None,
    **feature_map_options: Any,
) -> Any:
    """Linear attention over (batch, heads, seq, dim) tensors; returns v's dtype and shape.

    ``key_padding_mask`` is bool (batch, seq) with True at padded keys (nn.MultiheadAttention's
    convention); outputs at padded positions are zero. With ``causal=True``,
    ``return_state=True`` returns ``(out, state)`` so that a prompt is encoded in one call and
    continued token by token with ``linear_attention_step``.
    ``backend`` and ``chunk_size`` select the causal kernel (see ``ops.causal_product``); with
    the default ``elu`` map the causal form applies it inside one autograd node
    (``causal_linear_fused``: in the Triton kernels, or around the chunked torch path, which
    then saves q and k rather than their features).
    """
    check_qkv(q, k, v, same_length=causal)
    check_eps(eps)
    if return_state and not causal:
        raise ValueError("return_state=True needs causal=True (the recurrent form is causal)")
    mask = check_padding_mask(key_padding_mask, k.shape[0], k.shape[2])
    fm = _feature_map(feature_map, q.shape[-1], feature_map_options, recurrent=return_state)
    fused = _fused_backend(fm, q, k, v, backend) if causal and mask is None else None
    if fused is not None:
        out = causal_linear_fused(q, k, v, eps=float(eps), chunk_size=chunk_size, backend=fused)
        return (out, _state(fm, k, v, q.shape[2])) if return_state else out
    qf, kf = _features(fm, q, k, mask)
    vv = v.to(compute_dtype(v.dtype))
    if causal:
        launch = (max(qf.shape[-1], v.shape[-1]), math.prod(v.shape[:-2]))
        low = v.dtype in (torch.float16, torch.bfloat16)
        if low and resolve_backend(backend, v.device, *launch) == "triton":
            # 16-bit features feed the tensor cores (fp32 accumulation), like the inputs.
            qf, kf, vv = qf.to(v.dtype), kf.to(v.dtype), v
        out = causal_linear(qf, kf, vv, eps=float(eps), backend=backend, chunk_size=chunk_size)
    else:
        num = qf @ (kf.mT @ vv)
        den = qf @ kf.sum(-2).unsqueeze(-1)
        if torch.is_grad_enabled() and (num.requires_grad or den.requires_grad):
            out = num / (den + eps)
        else:  # inference: divide in place (one fewer (N, Dv) allocation)
            out = num.div_(den.add_(eps))
    if mask is not None and q.shape[2] == k.shape[2]:
        out = out.masked_fill(mask[:, None, :, None], 0.0)
    out = out.to(v.dtype)
    return (out, _state(fm, k, v, q.shape[2], kf)) if return_state else out


def _state(
    fm: FeatureMap,
    k: torch.Tensor,
    v: torch.Tensor,
    steps: int,
    kf: torch.Tensor | None = None,
) -> LinearAttentionState:
    """The recurrent state after a prompt, in the compute dtype (fp32 for 16-bit inputs)."""
    with torch.no_grad():
        dtype = compute_dtype(v.dtype)
        kf = (fm(k, is_query=False) if kf is None else kf).to(dtype)
        return LinearAttentionState(s=kf.mT @ v.to(dtype), z=kf.sum(-2), steps=steps)


def linear_attention_step(
    q_t: torch.Tensor,
    k_t: torch.Tensor,
    v_t: torch.Tensor,
    state: LinearAttentionState | None = None,
    *,
    feature_map: str | FeatureMap = "elu",
    eps: float = 1e-6,
    inplace: bool = False,
) -> tuple[torch.Tensor, LinearAttentionState]:
    """One token of causal linear attention in O(1) time and memory: the RNN form.

    ``q_t``, ``k_t``: (batch, heads, dim); ``v_t``: (batch, heads, dv). Returns the output
    (batch, heads, dv) in v's dtype and the updated state
    ``s ← s + φ(k_t) v_tᵀ``, ``z ← z + φ(k_t)``. Pass the same FeatureMap instance as the batch
    call (random-feature maps hold their projection). ``inplace=True`` updates ``state`` in
    place and returns it (no allocation per token; for decode loops that own their state).
    """
    _check_step_inputs(q_t, k_t, v_t)
    check_eps(eps)
    fm = _feature_map(feature_map, q_t.shape[-1], {}, recurrent=True)
    qf = fm(q_t, is_query=True)
    kf = fm(k_t, is_query=False)
    vv = v_t.to(compute_dtype(v_t.dtype))
    if state is None:
        b, h, f = kf.shape
        state = LinearAttentionState(
            s=kf.new_zeros(b, h, f, vv.shape[-1]), z=kf.new_zeros(b, h, f), steps=0
        )
    else:
        _check_state(state, kf, vv)
    b, h, f = kf.shape
    flat = state.s.view(b * h, f, -1)
    outer = (kf.reshape(b * h, f, 1), vv.reshape(b * h, 1, -1))
    if inplace:  # one fused rank-1 update, no new (F, Dv) tensor per token
        s = state.s
        flat.baddbmm_(*outer)
        z = state.z.add_(kf)
    else:
        s = torch.baddbmm(flat, *outer).view_as(state.s)
        z = state.z + kf
    num = torch.bmm(qf.reshape(b * h, 1, f), s.view(b * h, f, -1)).view(b, h, -1)
    den = (qf * z).sum(-1, keepdim=True)
    out = (num / (den + eps)).to(v_t.dtype)
    if inplace:
        state.steps += 1
        return out, state
    return out, LinearAttentionState(s=s, z=z, steps=state.steps + 1)


def _check_step_inputs(q_t: torch.Tensor, k_t: torch.Tensor, v_t: torch.Tensor) -> None:
    for name, t in (("q_t", q_t), ("k_t", k_t), ("v_t", v_t)):
        if not isinstance(t, torch.Tensor) or t.dim() != 3:
            raise ValueError(
                f"{name} must be a (batch, heads, dim) tensor, got "
                f"{tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__}"
            )
        if t.dtype not in FLOAT_DTYPES:
            raise TypeError(f"{name}.dtype={t.dtype} is not one of {FLOAT_DTYPES}")
    if q_t.shape != k_t.shape or q_t.shape[:2] != v_t.shape[:2]:
        raise ValueError(
            f"q_t, k_t must match and share (batch, heads) with v_t; got {tuple(q_t.shape)}, "
            f"{tuple(k_t.shape)}, {tuple(v_t.shape)}"
        )
    if not (q_t.dtype == k_t.dtype == v_t.dtype):
        raise TypeError(
            f"q_t, k_t, v_t must share one dtype; got {q_t.dtype}, {k_t.dtype}, {v_t.dtype}"
        )


def _check_state(state: LinearAttentionState, kf: torch.Tensor, vv: torch.Tensor) -> None:
    """The state must come from inputs of this batch, heads, feature and value size, in the
    compute dtype and on the device of this step."""
    if not isinstance(state, LinearAttentionState):
        raise TypeError(
            f"state must be a LinearAttentionState (from linear_attention(..., "
            f"return_state=True) or an earlier step), got {type(state).__name__}"
        )
    b, h, f = kf.shape
    if tuple(state.s.shape) != (b, h, f, vv.shape[-1]) or tuple(state.z.shape) != (b, h, f):
        raise ValueError(
            f"state has s {tuple(state.s.shape)} and z {tuple(state.z.shape)}, which do not fit "
            f"this step: expected s (batch, heads, features, dv) = {(b, h, f, vv.shape[-1])} "
            f"and z {(b, h, f)}"
        )
    if state.s.dtype != kf.dtype or state.z.dtype != kf.dtype or state.s.device != kf.device:
        raise TypeError(
            f"state holds {state.s.dtype} tensors on {state.s.device}; this step computes in "
            f"{kf.dtype} on {kf.device} (fp32 for 16-bit inputs, fp64 for fp64)"
        )
