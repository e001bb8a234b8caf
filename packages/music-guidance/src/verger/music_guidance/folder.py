"""The real-data path: any folder of audio files, streamed, resampled and cut into clips.

:class:`AudioFolder` walks a folder for audio files (WAV, FLAC, OGG, MP3: whatever
libsndfile reads), and yields ``(clip [C, T], label)`` one file at a time: read, mixed to the
wanted channels, resampled, cut into clips with a hop, near-silent clips skipped. Files are
sharded over DataLoader workers and distributed ranks. Labels come from FMA-style metadata:
``tracks.csv`` with FMA's three header rows (``track``/``genre_top``/``track_id``), or any
CSV with a ``track_id`` column; the track id of a file is the integer in its name
(``000/000002.mp3`` -> 2). Files without a label get -1. Unreadable files are skipped with a
warning (``strict=True`` raises instead).
"""

from __future__ import annotations

import csv
import random
import re
import warnings
from collections.abc import Iterator
from pathlib import Path

import torch
from torch import Tensor
from torch.utils.data import IterableDataset, get_worker_info

from verger.core.distributed import get_rank, get_world_size
from verger.music_guidance.audio import AudioFileError, read_audio, resample
from verger.music_guidance.validation import finite_number, integer

__all__ = ["AUDIO_EXTENSIONS", "AudioFolder", "collect_clips", "read_track_labels"]

AUDIO_EXTENSIONS = (".wav", ".flac", ".ogg", ".mp3", ".aiff", ".aif")


def read_track_labels(csv_path: str | Path, field: str = "genre_top") -> dict[int, str]:
    """``{track_id: label}`` from an FMA ``tracks.csv`` (multi-row header) or a flat CSV."""
    path = Path(csv_path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such metadata file")
    with open(path, newline="", encoding="utf-8") as f:
        rows = list(csv.reader(f))
    if len(rows) < 2:
        raise ValueError(f"{path}: no data rows")
    header = rows[0]
    if "track_id" in header and field in header:  # a flat CSV
        id_col, label_col, body = header.index("track_id"), header.index(field), rows[1:]
    elif len(rows) > 3 and field in rows[1] and rows[2] and rows[2][0] == "track_id":
        id_col, label_col, body = 0, rows[1].index(field), rows[3:]  # FMA: 3 header rows
    else:
        raise ValueError(
            f"{path}: expected a 'track_id' column and a {field!r} column (flat CSV), or FMA's "
            "tracks.csv header rows"
        )
    labels = {}
    for row in body:
        if (
            len(row) > max(id_col, label_col)
            and row[id_col].strip().isdigit()
            and row[label_col].strip()
        ):
            labels[int(row[id_col])] = row[label_col].strip()
    return labels


class AudioFolder(IterableDataset):
    """Stream ``(clip [channels, clip_samples], label index)`` from the audio files under ``root``."""

    def __init__(
        self,
        root: str | Path,
        *,
        sample_rate: int,
        clip_samples: int,
        channels: int = 1,
        hop_samples: int | None = None,
        metadata: str | Path | None = None,
        label_field: str = "genre_top",
        shuffle: bool = False,
        seed: int = 0,
        min_peak: float = 1e-3,
        strict: bool = False,
    ) -> None:
        self.root = Path(root)
        if not self.root.is_dir():
            raise FileNotFoundError(f"{self.root}: no such folder")
        integer("sample_rate", sample_rate, at_least=1)
        integer("clip_samples", clip_samples, at_least=1)
        integer("channels", channels, at_least=1)
        self.hop = integer(
            "hop_samples", hop_samples if hop_samples is not None else clip_samples, at_least=1
        )
        self.sample_rate, self.clip_samples, self.channels = sample_rate, clip_samples, channels
        self.min_peak = finite_number("min_peak", min_peak, at_least=0)
        self.shuffle, self.seed, self.strict = shuffle, seed, strict
        self.files = sorted(p for p in self.root.rglob("*") if p.suffix.lower() in AUDIO_EXTENSIONS)
        if not self.files:
            raise FileNotFoundError(f"{self.root}: no audio files ({', '.join(AUDIO_EXTENSIONS)})")
        self.track_labels = read_track_labels(metadata, label_field) if metadata is not None else {}
        self.classes = sorted(set(self.track_labels.values()))
        self._index = {name: i for i, name in enumerate(self.classes)}
        self.epoch = 0

    def label_of(self, path: Path) -> int:
        digits = re.findall(r"\d+", path.stem)
        if not digits:
            return -1
        name = self.track_labels.get(int(digits[-1]))
        return self._index[name] if name is not None else -1

    def _my_files(self) -> list[Path]:
        files = list(self.files)
        if self.shuffle:
            random.Random(self.seed + self.epoch).shuffle(files)
        info = get_worker_info()
        workers, worker = (info.num_workers, info.id) if info is not None else (1, 0)
        shards, shard = get_world_size() * workers, get_rank() * workers + worker
        return files[shard::shards]

    def clips_of(self, path: Path) -> Iterator[Tensor]:
        """The clips of one file (raises :class:`AudioFileError` when unreadable)."""
        audio = resample(read_audio(path).with_channels(self.channels), self.sample_rate)
        wave = audio.waveform
        for start in range(0, wave.shape[-1] - self.clip_samples + 1, self.hop):
            clip = wave[:, start : start + self.clip_samples]
            if float(clip.abs().max()) >= self.min_peak:
                yield clip

    def __iter__(self) -> Iterator[tuple[Tensor, int]]:
        for path in self._my_files():
            try:
                label = self.label_of(path)
                for clip in self.clips_of(path):
                    yield clip, label
            except AudioFileError as exc:
                if self.strict:
                    raise
                warnings.warn(f"skipping {exc}", stacklevel=2)


def collect_clips(dataset: AudioFolder, max_clips: int | None = None) -> tuple[Tensor, Tensor]:
    """Materialise up to ``max_clips`` clips: ``([N, C, T], labels [N])``."""
    clips, labels = [], []
    for clip, label in dataset:
        clips.append(clip)
        labels.append(label)
        if max_clips is not None and len(clips) >= max_clips:
            break
    if not clips:
        raise ValueError(f"{dataset.root}: no clip of {dataset.clip_samples} samples found")
    return torch.stack(clips), torch.tensor(labels, dtype=torch.long)
