"""The embedded default data: music21 corpus pieces rendered to audio clips, cached.

Three collections of the music21 corpus (installed with pip) are the classes: Bach chorales
(four voices, organ), folk tunes from Ryan's Mammoth Collection (one voice, fiddle) and
Palestrina mass movements (four or more voices, choir). Each piece's first
``seconds_per_piece`` seconds are rendered by the built-in synthesizer (or fluidsynth with a
General MIDI soundfont, ``synth="fluidsynth"``), normalised, and cut into clips of
``clip_samples`` samples; near-silent clips are dropped. Pieces, not clips, are split into
train and validation by a hash of their corpus path, so no piece is in both.

The cache ``$VERGER_DATA/music-guidance/embedded/<key>/`` holds ``clips.npz`` (int16 audio,
labels, piece index, split) and ``manifest.json`` (settings, music21 version, pieces, SHA-256
of the data); it is built once under a lock (several processes may start on an empty cache)
and written atomically. A corrupt cache raises :class:`DataCacheError`.
"""

from __future__ import annotations

import hashlib
import json
import tempfile
import zlib
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from verger.core.data.sources import data_dir
from verger.core.files import atomic_directory, build_once
from verger.core.progress import progress
from verger.music_guidance.synth import (
    TIMBRES,
    NoteEvent,
    fluidsynth_available,
    render_midi_fluidsynth,
    render_notes,
)
from verger.music_guidance.validation import finite_number, integer, one_of

__all__ = [
    "COLLECTIONS",
    "ClipSet",
    "DataCacheError",
    "EmbeddedDataConfig",
    "load_embedded",
    "piece_notes",
]

FORMAT = 1


@dataclass(frozen=True)
class Collection:
    """A class of the embedded data: corpus composer key, file suffixes, tempo and colour."""

    name: str
    composer: str
    suffixes: tuple[str, ...]
    quarter_bpm: float
    timbre: str


COLLECTIONS: dict[str, Collection] = {
    "bach_chorales": Collection("bach_chorales", "bach", (".mxl", ".xml"), 84.0, "organ"),
    "folk_tunes": Collection("folk_tunes", "ryansMammoth", (".abc",), 132.0, "fiddle"),
    "palestrina": Collection("palestrina", "palestrina", (".krn",), 150.0, "choir"),
}


class DataCacheError(RuntimeError):
    """The embedded-data cache is corrupt; the message names the file and how to rebuild."""


@dataclass(kw_only=True)
class EmbeddedDataConfig:
    """Which pieces, how they are rendered and cut."""

    collections: tuple[str, ...] = ("bach_chorales", "folk_tunes", "palestrina")
    pieces_per_collection: int = 24
    seconds_per_piece: float = 12.0
    sample_rate: int = 8000
    clip_samples: int = 8192
    synth: str = "builtin"
    validation_fraction: float = 0.15
    min_peak: float = 0.02

    def __post_init__(self) -> None:
        if not isinstance(self.collections, tuple | list) or not self.collections:
            raise ValueError(f"collections={self.collections!r} must be a non-empty tuple")
        for name in self.collections:
            one_of("collections[...]", name, COLLECTIONS)
        self.collections = tuple(self.collections)
        integer("pieces_per_collection", self.pieces_per_collection, at_least=2)
        finite_number("seconds_per_piece", self.seconds_per_piece, above=0)
        integer("sample_rate", self.sample_rate, at_least=1000)
        integer("clip_samples", self.clip_samples, at_least=64)
        if self.clip_samples > self.seconds_per_piece * self.sample_rate:
            raise ValueError(
                f"clip_samples={self.clip_samples} is longer than seconds_per_piece="
                f"{self.seconds_per_piece} at {self.sample_rate} Hz"
            )
        one_of("synth", self.synth, ("builtin", "fluidsynth", "auto"))
        fraction = finite_number("validation_fraction", self.validation_fraction, above=0)
        if fraction >= 1:
            raise ValueError(f"validation_fraction={fraction} must be in (0, 1)")
        finite_number("min_peak", self.min_peak, at_least=0)

    def resolved_synth(self) -> str:
        """``"auto"`` becomes fluidsynth when it and a soundfont are installed, else builtin."""
        if self.synth == "auto":
            return "fluidsynth" if fluidsynth_available() else "builtin"
        return self.synth

    def key(self) -> str:
        settings = {**asdict(self), "synth": self.resolved_synth(), "format": FORMAT}
        return hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:16]


@dataclass
class ClipSet:
    """Audio clips ``[N, 1, T]`` (float32 in [-1, 1]) with class labels and piece ids."""

    audio: Tensor
    labels: Tensor
    pieces: Tensor
    classes: list[str]
    sample_rate: int
    manifest: dict[str, Any] = field(default_factory=dict)

    def __len__(self) -> int:
        return self.audio.shape[0]

    def subset(self, index: Tensor) -> ClipSet:
        return ClipSet(
            self.audio[index],
            self.labels[index],
            self.pieces[index],
            self.classes,
            self.sample_rate,
            self.manifest,
        )

    def of_class(self, label: int) -> ClipSet:
        return self.subset(torch.nonzero(self.labels == label).flatten())


def _piece_paths(collection: Collection, count: int) -> list[str]:
    from music21 import corpus

    paths = sorted(
        str(p)
        for p in corpus.getComposer(collection.composer)
        if str(p).endswith(collection.suffixes)
    )
    if collection.name == "bach_chorales":  # the chorales are the 'bwv<number>.<number>' files
        paths = [p for p in paths if Path(p).name.startswith("bwv")]
    # A stable, spread-out choice that does not depend on how many pieces the corpus has.
    paths.sort(key=lambda p: hashlib.sha256(p.split("/corpus/")[-1].encode()).hexdigest())
    return paths[:count]


def piece_notes(path: str, seconds_per_quarter: float, max_seconds: float) -> list[NoteEvent]:
    """The notes of a corpus piece (all parts) starting before ``max_seconds``."""
    from music21 import converter

    score = converter.parse(path)
    if hasattr(score, "scores"):  # an Opus: take its first score
        score = score.scores[0] if score.scores else score
    events = []
    for element in score.flatten().notes:
        start = float(element.offset) * seconds_per_quarter
        if start >= max_seconds:
            continue
        duration = float(element.duration.quarterLength) * seconds_per_quarter
        for pitch in getattr(element, "pitches", ()):
            events.append(NoteEvent(start, max(duration, 0.05), float(pitch.midi), 0.8))
    return events


def _render_piece(
    path: str, collection: Collection, config: EmbeddedDataConfig, synth: str
) -> np.ndarray:
    spq = 60.0 / collection.quarter_bpm
    if synth == "fluidsynth":
        from music21 import converter, instrument

        score = converter.parse(path)
        if hasattr(score, "scores") and score.scores:
            score = score.scores[0]
        for part in getattr(score, "parts", [score]):
            inst = instrument.Instrument()
            inst.midiProgram = TIMBRES[collection.timbre].gm_program
            part.insert(0, inst)
        with tempfile.TemporaryDirectory() as tmp:
            midi = Path(tmp) / "piece.mid"
            score.write("midi", fp=str(midi))
            audio = render_midi_fluidsynth(
                midi, sample_rate=config.sample_rate, duration=config.seconds_per_piece
            )
        wave = audio.waveform[0].numpy()
        top = np.abs(wave).max()
        return (wave * (0.6 / top) if top > 0 else wave).astype(np.float32)
    notes = piece_notes(path, spq, config.seconds_per_piece)
    return render_notes(
        notes,
        sample_rate=config.sample_rate,
        duration=config.seconds_per_piece,
        timbre=collection.timbre,
    )


def _build(config: EmbeddedDataConfig, folder: Path) -> None:
    import music21

    synth = config.resolved_synth()
    clips: list[np.ndarray] = []
    labels: list[int] = []
    pieces: list[int] = []
    split: list[int] = []
    names: list[str] = []
    jobs = [
        (label, COLLECTIONS[name], path)
        for label, name in enumerate(config.collections)
        for path in _piece_paths(COLLECTIONS[name], config.pieces_per_collection)
    ]
    T = config.clip_samples
    for label, collection, path in progress(jobs, desc="render music21 corpus"):
        rel = path.split("/corpus/")[-1]
        wave = _render_piece(path, collection, config, synth)
        is_val = zlib.crc32(rel.encode()) % 10_000 < config.validation_fraction * 10_000
        for start in range(0, wave.shape[0] - T + 1, T):
            clip = wave[start : start + T]
            if np.abs(clip).max() < config.min_peak:
                continue
            clips.append(np.round(np.clip(clip, -1, 1) * 32767).astype(np.int16))
            labels.append(label)
            pieces.append(len(names))
            split.append(1 if is_val else 0)
        names.append(rel)
    if not clips:
        raise RuntimeError("the embedded data rendered no clips; check the music21 corpus install")
    split_arr, piece_arr = np.asarray(split, dtype=np.int8), np.asarray(pieces)
    for label, name in enumerate(config.collections):  # each class in both splits
        mask = np.asarray(labels) == label
        if not (split_arr[mask] == 1).any():  # move the class's last piece, all its clips
            split_arr[piece_arr == piece_arr[mask][-1]] = 1
        if not (split_arr[mask] == 0).any():
            raise RuntimeError(
                f"collection {name} has no training clips; raise pieces_per_collection"
            )
    with atomic_directory(folder) as tmp:
        data_file = tmp / "clips.npz"
        np.savez(
            data_file,
            audio=np.stack(clips),
            labels=np.asarray(labels, dtype=np.int64),
            pieces=np.asarray(pieces, dtype=np.int64),
            split=split_arr,
        )
        manifest = {
            "format": FORMAT,
            "settings": asdict(config),
            "synth": synth,
            "music21": music21.__version__,
            "classes": list(config.collections),
            "pieces": names,
            "clips": len(clips),
            "sha256": hashlib.sha256(data_file.read_bytes()).hexdigest(),
        }
        (tmp / "manifest.json").write_text(json.dumps(manifest, indent=2))


def _load(config: EmbeddedDataConfig, folder: Path, split: str) -> ClipSet | None:
    manifest_file, data_file = folder / "manifest.json", folder / "clips.npz"
    if not manifest_file.is_file():
        return None
    try:
        manifest = json.loads(manifest_file.read_text())
        if manifest.get("format") != FORMAT:
            return None
        if hashlib.sha256(data_file.read_bytes()).hexdigest() != manifest["sha256"]:
            raise ValueError("checksum mismatch")
        with np.load(data_file, allow_pickle=False) as data:
            arrays = {k: data[k] for k in ("audio", "labels", "pieces", "split")}
    except (OSError, ValueError, KeyError) as exc:
        raise DataCacheError(
            f"{folder}: the embedded-data cache is corrupt ({exc}); delete the folder or call "
            "load_embedded(..., rebuild=True)"
        ) from None
    keep = (
        np.ones(len(arrays["labels"]), dtype=bool)
        if split == "all"
        else arrays["split"] == (split == "validation")
    )
    audio = torch.from_numpy(arrays["audio"][keep].astype(np.float32) / 32767).unsqueeze(1)
    return ClipSet(
        audio,
        torch.from_numpy(arrays["labels"][keep]),
        torch.from_numpy(arrays["pieces"][keep]),
        list(manifest["classes"]),
        config.sample_rate,
        manifest,
    )


def load_embedded(
    config: EmbeddedDataConfig | None = None,
    split: str = "train",
    *,
    root: str | Path | None = None,
    rebuild: bool = False,
) -> ClipSet:
    """The clips of ``split`` (``"train"``, ``"validation"`` or ``"all"``), built if needed."""
    config = config or EmbeddedDataConfig()
    one_of("split", split, ("train", "validation", "all"))
    folder = Path(root) if root is not None else data_dir() / "music-guidance" / "embedded"
    folder = folder / config.key()
    if rebuild:
        _build(config, folder)

    def load() -> ClipSet | None:
        return _load(config, folder, split)

    def build() -> ClipSet:
        _build(config, folder)
        found = _load(config, folder, split)
        assert found is not None
        return found

    return build_once(folder, load, build)
