"""Domains as clusters: sequence embeddings, k-means, and domain weights of a small text set.

Default embedding (no model download): hashed term counts (``HashingVectorizer``) ->
sublinear TF-IDF -> truncated SVD -> unit length. ``method="sentence-transformers"`` uses a
local or named sentence-transformers model instead (a name may be downloaded from the
Hugging Face hub by that library: pass a local path to stay offline).

:class:`KMeansClusterer` fits both the embedding and ``MiniBatchKMeans``; ``save`` writes one
``.npz`` (no pickle) that :meth:`KMeansClusterer.load` restores exactly.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from verger.core.files import atomic_path

_FORMAT = "verger-kmeans-v1"


def _sklearn() -> Any:
    try:
        import sklearn  # noqa: F401
    except ImportError as exc:
        raise ImportError("clustering needs scikit-learn: pip install 'verger-core[data]'") from exc
    from sklearn import cluster, decomposition, feature_extraction

    return cluster, decomposition, feature_extraction


def _normalize(x: np.ndarray) -> np.ndarray:
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)


class TfidfSvdEmbedder:
    """Hashed TF-IDF + SVD text embedding with explicit, saveable state (``idf``, ``components``)."""

    def __init__(self, dim: int = 64, *, n_features: int = 2**16, seed: int = 0) -> None:
        if dim < 1 or n_features < dim:
            raise ValueError(f"dim={dim} must be >= 1 and <= n_features={n_features}")
        self.dim, self.n_features, self.seed = dim, n_features, seed
        self.idf: np.ndarray | None = None
        self.components: np.ndarray | None = None

    def _counts(self, texts: Sequence[str]) -> Any:
        _, _, fe = _sklearn()
        vec = fe.text.HashingVectorizer(
            n_features=self.n_features,
            alternate_sign=False,
            norm=None,
            token_pattern=r"(?u)\b\w+\b|[^\w\s]",
        )
        x = vec.transform(list(texts)).tocsr().astype(np.float64)
        x.data = 1.0 + np.log(x.data)  # sublinear tf
        return x

    def fit(self, texts: Sequence[str]) -> TfidfSvdEmbedder:
        _, decomposition, _ = _sklearn()
        x = self._counts(texts)
        df = np.bincount(x.indices, minlength=self.n_features)
        n = x.shape[0]
        self.idf = np.log((1.0 + n) / (1.0 + df)) + 1.0  # smooth idf, as sklearn's default
        k = min(self.dim, max(1, min(x.shape) - 1))
        svd = decomposition.TruncatedSVD(n_components=k, random_state=self.seed)
        svd.fit(self._weighted(x))
        comps = np.zeros((self.dim, self.n_features))
        comps[:k] = svd.components_
        self.components = comps
        return self

    def _weighted(self, x: Any) -> Any:
        from sklearn.preprocessing import normalize

        assert self.idf is not None
        return normalize(x.multiply(self.idf).tocsr(), norm="l2")

    def transform(self, texts: Sequence[str]) -> np.ndarray:
        if self.idf is None or self.components is None:
            raise RuntimeError("call fit(texts) before transform(texts)")
        z = self._weighted(self._counts(texts)) @ self.components.T
        return _normalize(np.asarray(z, dtype=np.float64)).astype(np.float32)


def embed_texts(
    texts: Sequence[str],
    *,
    dim: int = 64,
    method: str = "tfidf",
    model: str | None = None,
    seed: int = 0,
) -> np.ndarray:
    """Unit-length embeddings ``[len(texts), dim]`` (float32) of ``texts``.

    ``method="tfidf"`` (default) fits a :class:`TfidfSvdEmbedder` on ``texts``;
    ``"sentence-transformers"`` encodes with ``model`` (a local path or hub name).
    """
    if not texts:
        raise ValueError("texts is empty")
    if method == "tfidf":
        return TfidfSvdEmbedder(dim, seed=seed).fit(texts).transform(texts)
    if method == "sentence-transformers":
        if model is None:
            raise ValueError("method='sentence-transformers' needs model=<local path or name>")
        try:
            from sentence_transformers import SentenceTransformer
        except ImportError as exc:
            raise ImportError("pip install sentence-transformers for this method") from exc
        emb = SentenceTransformer(model).encode(list(texts), normalize_embeddings=True)
        return np.asarray(emb, dtype=np.float32)
    raise ValueError(f"method={method!r} must be 'tfidf' or 'sentence-transformers'")


class KMeansClusterer:
    """k-means (``MiniBatchKMeans``) over :class:`TfidfSvdEmbedder` embeddings of texts."""

    def __init__(
        self, n_clusters: int, *, dim: int = 64, n_features: int = 2**16, seed: int = 0
    ) -> None:
        if not isinstance(n_clusters, int) or n_clusters < 1:
            raise ValueError(f"n_clusters={n_clusters!r} must be an int >= 1")
        self.n_clusters = n_clusters
        self.seed = seed
        self.embedder = TfidfSvdEmbedder(dim, n_features=n_features, seed=seed)
        self.centroids: np.ndarray | None = None

    def fit(self, texts: Sequence[str]) -> KMeansClusterer:
        if len(texts) < self.n_clusters:
            raise ValueError(
                f"{len(texts)} texts cannot make n_clusters={self.n_clusters} clusters"
            )
        cluster, _, _ = _sklearn()
        z = self.embedder.fit(texts).transform(texts)
        km = cluster.MiniBatchKMeans(
            n_clusters=self.n_clusters, random_state=self.seed, n_init=3, batch_size=1024
        )
        km.fit(z)
        self.centroids = km.cluster_centers_.astype(np.float32)
        return self

    def predict(self, texts: Sequence[str]) -> np.ndarray:
        """Index of the nearest centroid (Euclidean) of each text."""
        if self.centroids is None:
            raise RuntimeError("call fit(texts) (or load a saved clusterer) before predict")
        z = self.embedder.transform(texts)
        d = ((z[:, None, :] - self.centroids[None, :, :]) ** 2).sum(-1)
        return d.argmin(1)

    def save(self, path: str | os.PathLike[str]) -> None:
        """Write centroids and embedder state to one ``.npz`` file (atomically)."""
        if self.centroids is None or self.embedder.idf is None or self.embedder.components is None:
            raise RuntimeError("fit the clusterer before saving it")
        meta = {
            "format": _FORMAT,
            "n_clusters": self.n_clusters,
            "seed": self.seed,
            "dim": self.embedder.dim,
            "n_features": self.embedder.n_features,
        }
        with atomic_path(path) as tmp, open(tmp, "wb") as f:
            np.savez(
                f,
                meta=np.array(json.dumps(meta)),
                centroids=self.centroids,
                idf=self.embedder.idf,
                components=self.embedder.components,
            )

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> KMeansClusterer:
        """Restore a clusterer written by :meth:`save`."""
        p = Path(path)
        remedy = "refit it with KMeansClusterer(n).fit(texts).save(path)"
        try:
            with np.load(p, allow_pickle=False) as z:
                meta = json.loads(str(z["meta"]))
                arrays = {k: z[k] for k in ("centroids", "idf", "components")}
        except FileNotFoundError:
            raise FileNotFoundError(f"clusterer file {p} does not exist; {remedy}") from None
        except (ValueError, KeyError, OSError, EOFError) as exc:
            raise ValueError(f"clusterer file {p} is corrupt ({exc}); {remedy}") from None
        if meta.get("format") != _FORMAT:
            raise ValueError(f"{p} is not a verger k-means file; {remedy}")
        obj = cls(
            meta["n_clusters"], dim=meta["dim"], n_features=meta["n_features"], seed=meta["seed"]
        )
        obj.centroids = arrays["centroids"]
        obj.embedder.idf = arrays["idf"]
        obj.embedder.components = arrays["components"]
        return obj


def estimate_domain_weights(
    texts: Sequence[str], clusterer: KMeansClusterer, *, smoothing: float = 0.0
) -> torch.Tensor:
    """Domain weights ``h`` of a text set: the histogram of nearest centroids, normalized.

    ``smoothing`` adds that pseudo-count to every cluster (keeps unseen clusters > 0).
    """
    if not texts:
        raise ValueError("texts is empty: need at least one in-domain text")
    if smoothing < 0:
        raise ValueError(f"smoothing={smoothing} must be >= 0")
    counts = np.bincount(clusterer.predict(texts), minlength=clusterer.n_clusters).astype(
        np.float64
    )
    counts += smoothing
    return torch.from_numpy(counts / counts.sum()).float()
