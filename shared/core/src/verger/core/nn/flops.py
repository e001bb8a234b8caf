"""Analytic FLOPs of a ``TransformerLM`` (what ``torch.utils.flop_counter`` counts).

Convention: matmul FLOPs only, 2 per multiply-add; norms, activations, softmax, rotary and
the embedding lookup are not counted. Per token, forward, with D = d_model, H = SwiGLU
hidden, V = vocab, T = sequence length, L = layers:

- attention projections (q, k, v, o): ``L * 2 * 4 * D^2``
- attention scores (QK^T and PV over the full T x T matrix, as the math path and the
  FLOP counter count it; a causal kernel skips about half): ``L * 2 * 2 * T * D``
- SwiGLU MLP (gate, up, down): ``L * 2 * 3 * D * H``
- lm_head: ``2 * D * V``

Training (forward + backward) is 3x the forward: each matmul has two backward matmuls.
These formulas assume the built-in softmax attention; plug-ins change the attention terms.
"""

from __future__ import annotations

from verger.core.nn.config import TransformerConfig


def flops_breakdown(config: TransformerConfig, seq_len: int) -> dict[str, int]:
    """Forward matmul FLOPs per token, by component (keys as in the module docstring)."""
    if isinstance(seq_len, bool) or not isinstance(seq_len, int) or seq_len < 1:
        raise ValueError(f"flops: seq_len={seq_len!r} must be a positive int")
    d, h, layers = config.d_model, config.hidden_size, config.n_layers
    return {
        "attention_projections": layers * 2 * 4 * d * d,
        "attention_scores": layers * 2 * 2 * seq_len * d,
        "mlp": layers * 2 * 3 * d * h,
        "lm_head": 2 * d * config.vocab_size,
    }


def flops_per_token(config: TransformerConfig, seq_len: int, *, training: bool = True) -> int:
    """Matmul FLOPs per token of a forward (``training=False``) or a training step (3x)."""
    forward = sum(flops_breakdown(config, seq_len).values())
    return 3 * forward if training else forward
