"""Sets of shapes with their sample pools: procedural (embedded default) or mesh files."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np

from verger.core.progress import progress
from verger.core.validation import integer
from verger.neural_parts.data.meshfiles import file_samples
from verger.neural_parts.data.procedural import (
    GENERATOR_VERSION,
    Part,
    ProceduralConfig,
    procedural_samples,
    random_parts,
)
from verger.neural_parts.data.samples import SampleSpec, ShapeSamples, cache_key, cached_samples


def default_cache_dir() -> Path:
    """``$VERGER_DATA/neural-parts`` (default ``~/.cache/verger/neural-parts``)."""
    from verger.core.data.sources import data_dir

    return data_dir() / "neural-parts"


def procedural_parts(seed: int, index: int, config: ProceduralConfig | None = None) -> list[Part]:
    """The parts of procedural shape ``index`` of the set drawn with ``seed`` (deterministic)."""
    integer("seed", seed, at_least=0)
    integer("index", index, at_least=0)
    return random_parts(np.random.default_rng([seed, index]), config or ProceduralConfig())


def procedural_shapes(
    n_shapes: int,
    *,
    seed: int = 0,
    first: int = 0,
    config: ProceduralConfig | None = None,
    spec: SampleSpec | None = None,
    cache_dir: str | Path | None = None,
    show_progress: bool | None = None,
) -> list[ShapeSamples]:
    """Shapes ``first .. first + n_shapes - 1`` of the procedural set drawn with ``seed``.

    Each shape's pools are built once and cached (``cache_dir``, default
    :func:`default_cache_dir`): a
    shape's content depends only on (seed, index, config, spec), so training and held-out
    sets are disjoint index ranges of the same stream.
    """
    integer("n_shapes", n_shapes, at_least=1)
    integer("first", first, at_least=0)
    config = config or ProceduralConfig()
    spec = spec or SampleSpec()
    folder = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    shapes = []
    for index in progress(
        range(first, first + n_shapes), desc="procedural shapes", enabled=show_progress
    ):
        key = cache_key(
            f"procedural-v{GENERATOR_VERSION}", config.key(), spec.key(), str(seed), str(index)
        )

        def build(index: int = index) -> ShapeSamples:
            parts = procedural_parts(seed, index, config)
            return procedural_samples(
                parts,
                spec,
                seed=(seed * 1_000_003 + index) % 2**32,
                name=f"procedural-{seed}-{index}",
            )

        shapes.append(cached_samples(folder / f"procedural-{key}.npz", build))
    return shapes


def mesh_shapes(
    paths: Sequence[str | Path],
    *,
    spec: SampleSpec | None = None,
    cache_dir: str | Path | None = None,
    seed: int = 0,
    show_progress: bool | None = None,
) -> list[ShapeSamples]:
    """Pools of mesh files (each must be closed), cached by file content and settings."""
    if len(paths) == 0:
        raise ValueError("paths is empty: give at least one mesh file")
    spec = spec or SampleSpec()
    folder = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    return [
        file_samples(p, spec, cache_dir=folder, seed=seed)
        for p in progress(paths, desc="mesh samples", enabled=show_progress)
    ]
