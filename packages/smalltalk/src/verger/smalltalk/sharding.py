"""Shard the training corpus with the trained routers: scores, one balanced assignment, files.

Every training sequence's prefix is scored by every router (in chunks, each saved atomically
under ``scores/`` so a killed job resumes where it stopped); the full ``[N, E]`` matrix goes
through the score exchange (counted bytes) and one balanced assignment with capacities that
differ by at most one. Then each expert's sequences are written to ``expert-XX.safetensors``
(its job reads only that file), the assignment to ``index.safetensors``, and ``manifest.json``
last: the index is written once, and a manifest that exists is the mark of a complete shard.
"""

from __future__ import annotations

import hashlib
import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save

from verger.core.files import atomic_write_bytes, atomic_write_json
from verger.core.nn import TransformerLM
from verger.core.progress import progress_bar
from verger.smalltalk.assign import balanced_capacities, solve_balanced
from verger.smalltalk.config import SmallTalkConfig
from verger.smalltalk.data import SequenceSet
from verger.smalltalk.exchange import LocalExchange
from verger.smalltalk.metrics import routing_purity
from verger.smalltalk.scoring import score_matrix

SHARDS_DIR = "shards"
MANIFEST = "manifest.json"
INDEX = "index.safetensors"


@dataclass
class ShardIndex:
    """A complete shard: each training sequence's expert and what it was computed from."""

    folder: Path
    experts: torch.Tensor  # int64 [N]: expert of training sequence i
    manifest: dict[str, Any]

    @property
    def counts(self) -> list[int]:
        return list(self.manifest["counts"])

    @property
    def fingerprint(self) -> str:
        """Identifies this index (experts record it; evaluation checks it)."""
        return str(self.manifest["fingerprint"])

    def shard_path(self, expert: int) -> Path:
        return self.folder / f"expert-{expert:02d}.safetensors"

    def load_shard(self, expert: int) -> SequenceSet:
        """The training sequences of ``expert`` (a clear error when its file is missing)."""
        if not 0 <= expert < len(self.counts):
            raise ValueError(f"expert={expert} must be in [0, {len(self.counts)})")
        return SequenceSet.load(self.shard_path(expert))


def shard_expert_file(folder: str | Path, expert: int) -> Path:
    """Where the shard of ``expert`` lives in a model folder."""
    return Path(folder) / SHARDS_DIR / f"expert-{expert:02d}.safetensors"


def load_shard_index(folder: str | Path) -> ShardIndex:
    """The shard index of a model folder; a clear error when sharding did not finish."""
    out = Path(folder) / SHARDS_DIR
    path = out / MANIFEST
    if not path.is_file():
        raise FileNotFoundError(
            f"{path} is missing: the corpus of {folder} is not sharded yet "
            "(`python -m verger.smalltalk shard --out FOLDER`)"
        )
    manifest = json.loads(path.read_text(encoding="utf-8"))
    try:
        with safe_open(str(out / INDEX), framework="pt") as f:
            experts = f.get_tensor("experts")
    except (SafetensorError, OSError) as exc:
        raise ValueError(
            f"{out / INDEX} is damaged ({exc}); shard again with --overwrite"
        ) from None
    return ShardIndex(out, experts, manifest)


def shard_corpus(
    config: SmallTalkConfig,
    folder: str | Path,
    *,
    routers: list[TransformerLM],
    train: SequenceSet,
    routers_fingerprint: str,
    device: torch.device | str = "cpu",
    chunk_size: int = 8192,
    show_progress: bool | None = None,
) -> ShardIndex:
    """Shard ``train`` into ``<folder>/shards/`` (see the module docstring).

    A complete shard of the same routers and data is returned as is (written once); one of
    other routers or data is an error. Chunks of scores left by a killed run are reused when
    they were computed by the same routers.
    """
    if len(routers) != config.num_experts:
        raise ValueError(f"got {len(routers)} routers for num_experts={config.num_experts}")
    if len(train) < config.num_experts:
        raise ValueError(
            f"{len(train)} training sequences cannot fill num_experts={config.num_experts} shards"
        )
    out = Path(folder) / SHARDS_DIR
    source = {
        "routers": routers_fingerprint,
        "data": train.fingerprint(),
        "prefix_len": config.prefix_len,
        "num_experts": config.num_experts,
        "assign_method": config.assign_method,
        "score_dtype": config.score_dtype,
    }
    if (out / MANIFEST).is_file():
        index = load_shard_index(folder)
        if index.manifest["source"] != source:
            raise ValueError(
                f"{out} holds a shard of other routers or data ({index.manifest['source']} vs "
                f"{source}): shard into a new model folder, or rerun `shard --overwrite`"
            )
        return index
    t0 = time.perf_counter()
    scores = _chunked_scores(config, out, routers, train, source, device, chunk_size, show_progress)
    exchange = LocalExchange(config.num_experts, score_dtype=config.score_dtype)
    gathered = exchange.gather(scores)
    capacities = balanced_capacities(len(train), config.num_experts)
    result = solve_balanced(gathered, capacities, method=config.assign_method)
    experts = result.experts
    for e in range(config.num_experts):
        train.subset((experts == e).nonzero().flatten()).save(out / f"expert-{e:02d}.safetensors")
    index_bytes = save({"experts": experts, "scores": gathered.contiguous()})
    atomic_write_bytes(out / INDEX, index_bytes)
    known = train.domains >= 0
    purity = (
        routing_purity(
            experts[known], train.domains[known], config.num_experts, len(train.domain_names)
        )
        if bool(known.any())
        else None
    )
    manifest = {
        "source": source,
        "sequences": len(train),
        "counts": torch.bincount(experts, minlength=config.num_experts).tolist(),
        "fingerprint": hashlib.sha256(index_bytes).hexdigest()[:16],
        "assign_method": result.method,
        "assign_relative_gap": result.relative_gap,
        "exchange": exchange.counter.as_dict(),
        "prefix_tokens_scored": len(train) * (config.prefix_len - 1),
        "purity": None if purity is None else purity["purity"],
        "purity_by_domain": None
        if purity is None
        else dict(zip(train.domain_names, purity["by_domain"])),
        "confusion": None if purity is None else purity["confusion"],
        "domain_names": train.domain_names,
        "seconds": time.perf_counter() - t0,
    }
    atomic_write_json(out / MANIFEST, manifest)  # last: the shard is complete
    return ShardIndex(out, experts, manifest)


def _chunked_scores(
    config: SmallTalkConfig,
    out: Path,
    routers: list[TransformerLM],
    train: SequenceSet,
    source: dict[str, Any],
    device: torch.device | str,
    chunk_size: int,
    show_progress: bool | None,
) -> torch.Tensor:
    n = len(train)
    starts = list(range(0, n, chunk_size))
    parts = []
    tag = json.dumps(source, sort_keys=True)
    bar = progress_bar(total=len(starts), desc="scoring prefixes", enabled=show_progress)
    try:
        for start in starts:
            stop = min(start + chunk_size, n)
            path = out / "scores" / f"chunk-{start:010d}-{stop:010d}.safetensors"
            chunk = _read_chunk(path, tag)
            if chunk is None:
                chunk = score_matrix(
                    routers,
                    train.tokens[start:stop],
                    config.prefix_len,
                    batch_size=config.score_batch_size,
                    device=device,
                )
                atomic_write_bytes(path, save({"scores": chunk}, metadata={"source": tag}))
            parts.append(chunk)
            bar.update(1)
    finally:
        bar.close()
    return torch.cat(parts)


def _read_chunk(path: Path, tag: str) -> torch.Tensor | None:
    if not path.is_file():
        return None
    try:
        with safe_open(str(path), framework="pt") as f:
            if (f.metadata() or {}).get("source") != tag:
                return None  # computed by other routers: recompute
            return f.get_tensor("scores")
    except (SafetensorError, OSError):
        return None  # a damaged chunk is recomputed
