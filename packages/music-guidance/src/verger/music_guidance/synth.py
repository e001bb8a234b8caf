"""Score to audio: a built-in additive synthesizer (pip alone) or fluidsynth with a GM soundfont.

The built-in synthesizer renders each note as a sum of harmonics under an ADSR envelope with
optional vibrato, band-limited below Nyquist; a :class:`Timbre` fixes the harmonic amplitudes
and envelope (organ, flute, choir, fiddle, piano). It is not meant to sound like the
instruments, only to give each corpus collection its own, stable colour.

:func:`fluidsynth_available` finds the ``fluidsynth`` program and a General MIDI soundfont
(``$VERGER_SOUNDFONT``, else Debian's ``timgm6mb-soundfont`` / ``fluid-soundfont-gm`` paths);
:func:`render_midi_fluidsynth` renders a MIDI file with it.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from verger.music_guidance.audio import Audio, read_audio, resample

__all__ = [
    "TIMBRES",
    "NoteEvent",
    "Timbre",
    "fluidsynth_available",
    "render_midi_fluidsynth",
    "render_notes",
]

SOUNDFONT_PATHS = (
    "/usr/share/sounds/sf2/TimGM6mb.sf2",
    "/usr/share/sounds/sf2/FluidR3_GM.sf2",
    "/usr/share/soundfonts/default.sf2",
    "/usr/share/sounds/sf2/default-GM.sf2",
)


@dataclass(frozen=True)
class NoteEvent:
    """A note: start and duration in seconds, MIDI pitch (may be fractional), velocity in (0, 1]."""

    start: float
    duration: float
    pitch: float
    velocity: float = 0.8


@dataclass(frozen=True)
class Timbre:
    """Harmonic amplitudes (fundamental first) and an ADSR envelope in seconds."""

    name: str
    harmonics: tuple[float, ...]
    attack: float = 0.01
    decay: float = 0.1
    sustain: float = 0.8
    release: float = 0.05
    vibrato_hz: float = 0.0
    vibrato_cents: float = 0.0
    gm_program: int = 0  # the General MIDI program fluidsynth uses for this colour


TIMBRES: dict[str, Timbre] = {
    "organ": Timbre("organ", (1.0, 0.7, 0.5, 0.35, 0.3, 0.2, 0.15, 0.12), 0.02, 0.05, 0.95, 0.06, gm_program=19),
    "flute": Timbre("flute", (1.0, 0.25, 0.08, 0.03), 0.06, 0.1, 0.85, 0.08, 5.0, 15.0, gm_program=73),
    "choir": Timbre("choir", (1.0, 0.45, 0.35, 0.1, 0.08), 0.12, 0.2, 0.8, 0.2, 4.5, 25.0, gm_program=52),
    "fiddle": Timbre("fiddle", tuple(1.0 / k for k in range(1, 11)), 0.04, 0.1, 0.85, 0.08, 6.0, 20.0, gm_program=40),
    "piano": Timbre("piano", (1.0, 0.5, 0.3, 0.2, 0.1, 0.05), 0.003, 0.6, 0.15, 0.2, gm_program=0),
}  # fmt: skip


def _envelope(n_on: int, n_total: int, sr: int, timbre: Timbre) -> np.ndarray:
    """ADSR over ``n_total`` samples, the key released after ``n_on``."""
    t = np.arange(n_total) / sr
    a, d, s = max(timbre.attack, 1.0 / sr), max(timbre.decay, 1.0 / sr), timbre.sustain
    env = np.where(t < a, t / a, np.where(t < a + d, 1 - (1 - s) * (t - a) / d, s))
    t_off = n_on / sr
    level_off = float(np.interp(t_off, t, env)) if n_on < n_total else s
    release = np.maximum(0.0, level_off * (1 - (t - t_off) / max(timbre.release, 1.0 / sr)))
    return np.where(t < t_off, env, release).astype(np.float64)


def render_notes(
    notes: Iterable[NoteEvent],
    *,
    sample_rate: int,
    duration: float,
    timbre: Timbre | str = "organ",
    peak: float = 0.6,
) -> np.ndarray:
    """Mono float32 audio of ``duration`` seconds; normalised to ``peak`` (silence stays 0)."""
    timbre = TIMBRES[timbre] if isinstance(timbre, str) else timbre
    total = round(duration * sample_rate)
    out = np.zeros(total, dtype=np.float64)
    nyquist = sample_rate / 2
    for note in notes:
        start = round(note.start * sample_rate)
        if start >= total or note.duration <= 0:
            continue
        n_on = max(1, round(note.duration * sample_rate))
        n_total = min(n_on + int(timbre.release * sample_rate), total - start)
        t = np.arange(n_total) / sample_rate
        f0 = 440.0 * 2.0 ** ((note.pitch - 69) / 12)
        phase = 2 * np.pi * f0 * t
        if timbre.vibrato_hz > 0:
            ratio = 2 ** (timbre.vibrato_cents / 1200) - 1
            phase += f0 * ratio / timbre.vibrato_hz * np.sin(2 * np.pi * timbre.vibrato_hz * t)
        wave = np.zeros(n_total)
        for k, amp in enumerate(timbre.harmonics, start=1):
            if k * f0 >= 0.95 * nyquist:
                break
            wave += amp * np.sin(k * phase)
        out[start : start + n_total] += (
            note.velocity * wave * _envelope(n_on, n_total, sample_rate, timbre)
        )
    top = np.abs(out).max() if total else 0.0
    if top > 0:
        out *= peak / top
    return out.astype(np.float32)


def fluidsynth_available() -> tuple[str, str] | None:
    """``(fluidsynth executable, soundfont path)`` when both are installed, else None."""
    exe = shutil.which("fluidsynth")
    candidates: Sequence[str] = [os.environ.get("VERGER_SOUNDFONT", ""), *SOUNDFONT_PATHS]
    font = next((p for p in candidates if p and Path(p).is_file()), None)
    return (exe, font) if exe and font else None


def render_midi_fluidsynth(
    midi_path: str | Path,
    *,
    sample_rate: int,
    duration: float | None = None,
    executable: str | None = None,
    soundfont: str | None = None,
    timeout_s: float = 120.0,
) -> Audio:
    """Render ``midi_path`` with fluidsynth (mono, ``sample_rate``), cut to ``duration`` s."""
    found = fluidsynth_available() if executable is None or soundfont is None else None
    exe = executable or (found[0] if found else None)
    font = soundfont or (found[1] if found else None)
    if not exe or not font:
        raise RuntimeError(
            "fluidsynth or a General MIDI soundfont is not installed (Debian: apt-get install "
            "fluidsynth timgm6mb-soundfont; or set VERGER_SOUNDFONT); use synth='builtin'"
        )
    render_rate = 44100 if sample_rate < 22050 else sample_rate  # fluidsynth's usual rates
    with tempfile.TemporaryDirectory() as tmp:
        wav = Path(tmp) / "render.wav"
        cmd = [
            exe,
            "-ni",
            "-g",
            "0.6",
            "-r",
            str(render_rate),
            "-F",
            str(wav),
            font,
            str(midi_path),
        ]
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout_s, check=False)
        if done.returncode != 0 or not wav.is_file():
            raise RuntimeError(f"fluidsynth failed on {midi_path}: {done.stderr.strip()[-500:]}")
        audio = read_audio(wav)
    audio = resample(audio.with_channels(1), sample_rate)
    if duration is not None:
        n = round(duration * sample_rate)
        wave = audio.waveform[:, :n]
        if wave.shape[-1] < n:
            wave = np.pad(wave.numpy(), ((0, 0), (0, n - wave.shape[-1])))  # type: ignore[assignment]
        audio = Audio(wave, sample_rate)
    return audio
