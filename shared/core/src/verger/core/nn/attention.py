"""The default attention: multi-head causal softmax attention through torch SDPA."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from verger.core.nn.config import TransformerConfig
from verger.core.nn.registry import register_attention
from verger.core.nn.rotary import RotaryEmbedding


@dataclass
class KVCache:
    """Keys and values seen so far, ``[B, H, S, Dh]`` each (rotary already applied)."""

    k: Tensor
    v: Tensor

    @property
    def length(self) -> int:
        return self.k.shape[2]


class SoftmaxAttention(nn.Module):
    """Causal multi-head attention with rotary q/k; projections ``q_proj, k_proj, v_proj,
    o_proj`` are bias-free ``nn.Linear(d_model, d_model)``."""

    def __init__(self, config: TransformerConfig, layer_index: int = 0) -> None:
        super().__init__()
        if config.attention_options:
            raise ValueError(
                "attention='softmax' takes no attention_options, got "
                f"{sorted(config.attention_options)}"
            )
        d = config.d_model
        self.layer_index = layer_index
        self.n_heads, self.head_dim = config.n_heads, config.head_dim
        self.q_proj = nn.Linear(d, d, bias=False)
        self.k_proj = nn.Linear(d, d, bias=False)
        self.v_proj = nn.Linear(d, d, bias=False)
        self.o_proj = nn.Linear(d, d, bias=False)
        self.rotary = RotaryEmbedding(
            config.head_dim, config.max_seq_len, base=config.rope_base, fused=config.fused
        )
        self.dropout = config.dropout

    def forward(
        self,
        x: Tensor,
        *,
        cache: KVCache | None = None,
        use_cache: bool = False,
        start_pos: int = 0,
    ) -> tuple[Tensor, KVCache | None]:
        b, t, d = x.shape
        if cache is not None:
            if not isinstance(cache, KVCache):
                raise TypeError(f"SoftmaxAttention: cache must be a KVCache, got {type(cache)}")
            if cache.length != start_pos:
                raise ValueError(
                    f"SoftmaxAttention: cache holds {cache.length} positions but "
                    f"start_pos={start_pos}"
                )
        shape = (b, t, self.n_heads, self.head_dim)
        q = self.rotary(self.q_proj(x).view(shape), start_pos).transpose(1, 2)
        k = self.rotary(self.k_proj(x).view(shape), start_pos).transpose(1, 2)
        v = self.v_proj(x).view(shape).transpose(1, 2)
        if cache is not None:
            k = torch.cat((cache.k, k), dim=2)
            v = torch.cat((cache.v, v), dim=2)
        s = k.shape[2]
        mask, causal = None, False
        if t == s:
            causal = t > 1
        elif t > 1:  # new queries after a cached prefix: query i sees keys <= s - t + i
            pos_k = torch.arange(s, device=x.device)
            pos_q = torch.arange(s - t, s, device=x.device)
            mask = pos_k[None, :] <= pos_q[:, None]
        y = F.scaled_dot_product_attention(
            q, k, v, attn_mask=mask, is_causal=causal,
            dropout_p=self.dropout if self.training else 0.0,
        )  # fmt: skip
        y = self.o_proj(y.transpose(1, 2).reshape(b, t, d))
        return y, (KVCache(k, v) if use_cache else None)


@register_attention("softmax")
def _softmax_attention(config: TransformerConfig, layer_index: int) -> nn.Module:
    return SoftmaxAttention(config, layer_index)
