"""Transformer LM building blocks shared by the verger packages.

``TransformerConfig`` -> ``TransformerLM`` (GPT-style decoder: RMSNorm, rotary attention,
SwiGLU, tied embeddings, fused kernels, KV-cache generation, safetensors save/load).
Attention is pluggable through :func:`register_attention`; the default is ``"softmax"``
(torch SDPA).
"""

from verger.core.nn.attention import KVCache, SoftmaxAttention
from verger.core.nn.config import TransformerConfig
from verger.core.nn.flops import flops_breakdown, flops_per_token
from verger.core.nn.generation import sample_next
from verger.core.nn.layers import Block, RMSNorm, SwiGLU, make_norm
from verger.core.nn.model import LMCache, LMOutput, TransformerLM
from verger.core.nn.registry import (
    AttentionFactory,
    AttentionModule,
    available_attentions,
    get_attention,
    register_attention,
)
from verger.core.nn.rotary import RotaryEmbedding, apply_rotary

__all__ = [
    "AttentionFactory",
    "AttentionModule",
    "Block",
    "KVCache",
    "LMCache",
    "LMOutput",
    "RMSNorm",
    "RotaryEmbedding",
    "SoftmaxAttention",
    "SwiGLU",
    "TransformerConfig",
    "TransformerLM",
    "apply_rotary",
    "available_attentions",
    "flops_breakdown",
    "flops_per_token",
    "get_attention",
    "make_norm",
    "register_attention",
    "sample_next",
]
