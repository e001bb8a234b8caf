"""Audio in and out: the :class:`Audio` value, WAV files (soundfile), checks, resampling, mels.

torchaudio (>= 2.9) moved file I/O to torchcodec, so files go through soundfile; its
transforms (``MelSpectrogram``, ``Resample``) are pure torch and used as they are.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import soundfile as sf
import torch
import torchaudio
from torch import Tensor

from verger.core.files import atomic_path
from verger.music_guidance.validation import integer

__all__ = [
    "Audio",
    "AudioFileError",
    "SampleRateMismatchError",
    "check_audio_tensor",
    "check_same_rate",
    "log_mel",
    "read_audio",
    "resample",
    "write_wav",
]

SILENCE = 1e-5  # peak amplitude below which a clip counts as silent


class AudioFileError(ValueError):
    """An audio file is missing, unreadable or corrupt; the message names it."""


class SampleRateMismatchError(ValueError):
    """Two pieces of audio (or audio and a model) have different sample rates."""


def check_audio_tensor(x: Tensor, name: str = "audio", *, allow_silent: bool = False) -> Tensor:
    """Check a waveform ``[C, T]`` or ``[B, C, T]``: floating, finite, non-empty, not silent."""
    if not isinstance(x, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if x.ndim not in (2, 3):
        raise ValueError(
            f"{name} must be [channels, samples] or [batch, channels, samples], got {tuple(x.shape)}"
        )
    if not x.is_floating_point():
        raise ValueError(f"{name} must be a floating-point waveform, got {x.dtype}")
    if x.numel() == 0 or x.shape[-1] == 0:
        raise ValueError(f"{name} is empty (shape {tuple(x.shape)})")
    if not bool(torch.isfinite(x).all()):
        raise ValueError(f"{name} contains NaN or inf samples")
    if not allow_silent and float(x.abs().max()) < SILENCE:
        raise ValueError(
            f"{name} is silent (peak {float(x.abs().max()):.2g} < {SILENCE:g}): nothing to guide toward"
        )
    return x


@dataclass
class Audio:
    """A waveform ``[channels, samples]`` (float32) at ``sample_rate`` Hz."""

    waveform: Tensor
    sample_rate: int

    def __post_init__(self) -> None:
        if isinstance(self.waveform, np.ndarray):
            self.waveform = torch.from_numpy(np.ascontiguousarray(self.waveform))
        if isinstance(self.waveform, Tensor) and self.waveform.ndim == 1:
            self.waveform = self.waveform.unsqueeze(0)
        check_audio_tensor(self.waveform, "waveform", allow_silent=True)
        if self.waveform.ndim != 2:
            raise ValueError(
                f"waveform must be [channels, samples], got {tuple(self.waveform.shape)}"
            )
        integer("sample_rate", self.sample_rate, at_least=1)

    @property
    def channels(self) -> int:
        return self.waveform.shape[0]

    @property
    def num_samples(self) -> int:
        return self.waveform.shape[-1]

    @property
    def seconds(self) -> float:
        return self.num_samples / self.sample_rate

    def with_channels(self, channels: int) -> Audio:
        """Downmix to mono (mean) or repeat mono to ``channels``."""
        if channels == self.channels:
            return self
        if channels == 1:
            return Audio(self.waveform.mean(0, keepdim=True), self.sample_rate)
        if self.channels == 1:
            return Audio(self.waveform.expand(channels, -1).clone(), self.sample_rate)
        raise ValueError(f"cannot map {self.channels} channels to {channels}")

    def check_not_silent(self, name: str = "audio") -> Audio:
        check_audio_tensor(self.waveform, name)
        return self


def check_same_rate(rate_a: int, rate_b: int, what: str) -> None:
    """Raise :class:`SampleRateMismatchError` naming ``what`` when the rates differ."""
    if rate_a != rate_b:
        raise SampleRateMismatchError(
            f"{what}: sample rates differ ({rate_a} Hz vs {rate_b} Hz); resample first "
            "(verger.music_guidance.resample)"
        )


def read_audio(path: str | Path, *, frames: int = -1, start: int = 0) -> Audio:
    """Read an audio file soundfile understands (WAV, FLAC, OGG...) as float32 ``[C, T]``."""
    file = Path(path)
    if not file.is_file():
        raise AudioFileError(f"{file}: no such audio file")
    try:
        data, rate = sf.read(str(file), frames=frames, start=start, dtype="float32", always_2d=True)
    except (sf.LibsndfileError, RuntimeError, ValueError, TypeError) as exc:
        raise AudioFileError(f"{file}: not a readable audio file ({exc})") from None
    if data.size == 0:
        raise AudioFileError(f"{file}: the file holds no audio samples")
    return Audio(torch.from_numpy(data.T.copy()), int(rate))


def write_wav(path: str | Path, audio: Audio, *, subtype: str = "PCM_16") -> Path:
    """Write ``audio`` as a WAV file, atomically; samples are clipped to [-1, 1]."""
    target = Path(path)
    data = audio.waveform.detach().float().clamp(-1, 1).cpu().numpy().T
    with atomic_path(target) as tmp:
        sf.write(str(tmp), data, audio.sample_rate, subtype=subtype, format="WAV")
    return target


def resample(audio: Audio, sample_rate: int) -> Audio:
    """Band-limited resampling (torchaudio's windowed-sinc ``resample``)."""
    integer("sample_rate", sample_rate, at_least=1)
    if sample_rate == audio.sample_rate:
        return audio
    wave = torchaudio.functional.resample(audio.waveform, audio.sample_rate, sample_rate)
    return Audio(wave, sample_rate)


@functools.lru_cache(maxsize=16)
def _mel_transform(
    sample_rate: int, n_fft: int, hop: int, n_mels: int, device: str, dtype: torch.dtype
) -> torchaudio.transforms.MelSpectrogram:
    return torchaudio.transforms.MelSpectrogram(
        sample_rate=sample_rate,
        n_fft=n_fft,
        hop_length=hop,
        n_mels=n_mels,
        f_min=0.0,
        f_max=sample_rate / 2,
        power=2.0,
        center=True,
    ).to(device=device, dtype=dtype)


def log_mel(
    x: Tensor, sample_rate: int, *, n_fft: int = 512, hop: int = 128, n_mels: int = 64
) -> Tensor:
    """``log(mel power + 1e-5)`` of ``x [..., T]`` -> ``[..., n_mels, frames]`` (differentiable).

    Frame ``j`` is centred on sample ``j * hop``.
    """
    mel = _mel_transform(sample_rate, n_fft, hop, n_mels, str(x.device), x.dtype)
    return torch.log(mel(x) + 1e-5)
