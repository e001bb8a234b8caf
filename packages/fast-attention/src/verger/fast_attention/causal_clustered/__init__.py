"""Causal clustered attention for language models: centroids fixed before the sequence.

Clustered attention (Vyas et al., 2020) is defined for encoders: its centroids are the means
of all queries of the sequence, so in a decoder the weights at position i would depend on
later tokens. Here the centroids are given (``ClusteredAttention(causal=True)`` learns them
as an exponential moving average over training batches, as the Routing Transformer does), so
query i's cluster depends only on q_i and every output depends only on positions ≤ i.

Query i in cluster ``a`` gets the centroid's softmax weights renormalized over keys j ≤ i:

    base_i = Σ_{j≤i} exp(ℓ_aj) v_j / z_i,   ℓ_aj = scale · c_a·k_j,   z_i = Σ_{j≤i} exp(ℓ_aj).

Improved clustered (``topk``): with chunks of ``chunk_size`` positions, query i in chunk b
attends exactly to E_i = (the centroid's top-k keys among chunks < b) ∪ (its own chunk's keys
j ≤ i), scaled by the centroid's mass on E_i; the other keys keep the centroid's weights:

    out_i = Σ_{j≤i, j∉E_i} exp(ℓ_aj) v_j / z_i + (Σ_{j∈E_i} exp(ℓ_aj) / z_i) · softmax_E(q_i·k) v.

Per-chunk sums are combined by an exclusive scan over chunks with a running max, so nothing
under- or overflows and no stabilizer looks ahead. The same quantities kept as a constant-size
``ClusteredAttentionState`` give the recurrent form (``causal_clustered_attention_step``):
O(C·D + (topk + chunk_size)·D) per generated token, whatever the context length.

Modules: ``parallel`` (the chunked form), ``step`` (one token from the state), ``state``,
``scans`` (sums and top-k sets over chunks), ``top_keys`` (the torch path's top-k products),
``centroids`` (checks, assignment, ``LearnedCentroids``).
"""

from verger.fast_attention.causal_clustered.centroids import LearnedCentroids, assign_to_centroids
from verger.fast_attention.causal_clustered.parallel import causal_clustered_attention
from verger.fast_attention.causal_clustered.state import ClusteredAttentionState
from verger.fast_attention.causal_clustered.step import causal_clustered_attention_step

__all__ = [
    "ClusteredAttentionState",
    "LearnedCentroids",
    "assign_to_centroids",
    "causal_clustered_attention",
    "causal_clustered_attention_step",
]
