"""verger-fast-attention: linear attention and (improved) clustered attention.

Importing this package registers ``linear``, ``clustered`` and ``improved_clustered`` in
verger.core's attention registry, so ``TransformerConfig(attention="linear")`` works.
"""

from verger.core import package_version
from verger.fast_attention.causal_clustered import (
    ClusteredAttentionState,
    LearnedCentroids,
    assign_to_centroids,
    causal_clustered_attention,
    causal_clustered_attention_step,
)
from verger.fast_attention.clustered import (
    cluster_queries,
    clustered_attention,
    clustered_attention_from_clusters,
)
from verger.fast_attention.feature_maps import (
    EluFeatureMap,
    FavorFeatureMap,
    FeatureMap,
    available_feature_maps,
    get_feature_map,
    register_feature_map,
)
from verger.fast_attention.linear import (
    LinearAttentionState,
    linear_attention,
    linear_attention_step,
)
from verger.fast_attention.modules import (
    CausalLinearAttention,
    ClusteredAttention,
    ImprovedClusteredAttention,
    LinearAttention,
    register_with_core,
)
from verger.fast_attention.ops.causal_linear import (
    causal_linear,
    causal_linear_fused,
    causal_product,
)

__version__ = package_version("verger-fast-attention")

register_with_core()

__all__ = [
    "CausalLinearAttention",
    "ClusteredAttention",
    "ClusteredAttentionState",
    "EluFeatureMap",
    "FavorFeatureMap",
    "FeatureMap",
    "ImprovedClusteredAttention",
    "LearnedCentroids",
    "LinearAttention",
    "LinearAttentionState",
    "__version__",
    "assign_to_centroids",
    "available_feature_maps",
    "causal_clustered_attention",
    "causal_clustered_attention_step",
    "causal_linear",
    "causal_linear_fused",
    "causal_product",
    "cluster_queries",
    "clustered_attention",
    "clustered_attention_from_clusters",
    "get_feature_map",
    "linear_attention",
    "linear_attention_step",
    "register_feature_map",
    "register_with_core",
]
