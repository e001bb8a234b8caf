import os
import stat
import sys
import textwrap

import numpy as np
import pytest
import soundfile as sf
import torch

from verger.music_guidance.audio import AudioFileError
from verger.music_guidance.embedded import (
    DataCacheError,
    EmbeddedDataConfig,
    load_embedded,
    piece_notes,
)
from verger.music_guidance.folder import AudioFolder, collect_clips, read_track_labels
from verger.music_guidance.synth import (
    NoteEvent,
    fluidsynth_available,
    render_midi_fluidsynth,
    render_notes,
)

SMALL = dict(pieces_per_collection=2, seconds_per_piece=2.0, sample_rate=4000, clip_samples=2048)


def test_builtin_synth_plays_the_pitch():
    sr = 8000
    wave = render_notes(
        [NoteEvent(0.0, 0.8, 69.0)], sample_rate=sr, duration=1.0, timbre="flute", peak=0.5
    )
    assert wave.shape == (8000,) and abs(float(np.abs(wave).max()) - 0.5) < 1e-6
    spectrum = np.abs(np.fft.rfft(wave[:6000] * np.hanning(6000)))
    freqs = np.fft.rfftfreq(6000, 1 / sr)
    assert abs(freqs[spectrum.argmax()] - 440.0) < 3.0
    assert np.abs(wave[7500:]).max() == 0  # released well before the end
    # harmonics above Nyquist are left out (no aliasing): a 3 kHz note keeps only its fundamental
    high = render_notes(
        [NoteEvent(0.0, 0.5, 69 + 12 * np.log2(3000 / 440))],
        sample_rate=sr,
        duration=0.5,
        timbre="organ",
    )
    spec = np.abs(np.fft.rfft(high))
    assert spec[np.fft.rfftfreq(4000, 1 / sr) < 2500].max() < 0.05 * spec.max()


def test_piece_notes_from_the_music21_corpus():
    from music21 import corpus

    path = str(corpus.getComposer("bach")[0])
    notes = piece_notes(path, 0.5, 4.0)
    assert notes and all(0 <= n.start < 4.0 and n.duration > 0 for n in notes)
    assert 30 < np.mean([n.pitch for n in notes]) < 90


def test_embedded_data_builds_once_and_reads_back(tmp_path):
    cfg = EmbeddedDataConfig(**SMALL)
    train = load_embedded(cfg, "train", root=tmp_path)
    val = load_embedded(cfg, "validation", root=tmp_path)
    assert train.audio.shape[1:] == (1, 2048) and len(train) > 0 and len(val) > 0
    assert set(train.labels.tolist()) == {0, 1, 2} and train.classes == list(cfg.collections)
    assert not set(train.pieces.tolist()) & set(val.pieces.tolist())  # no piece in both splits
    assert float(train.audio.abs().max()) <= 1.0
    folder = tmp_path / cfg.key()
    manifest = (folder / "manifest.json").read_text()
    assert "music21" in manifest and cfg.key() in str(folder)
    mtime = (folder / "clips.npz").stat().st_mtime_ns
    again = load_embedded(cfg, "train", root=tmp_path)
    assert (
        torch.equal(again.audio, train.audio) and (folder / "clips.npz").stat().st_mtime_ns == mtime
    )
    (folder / "clips.npz").write_bytes(b"garbage")
    with pytest.raises(DataCacheError, match="corrupt"):
        load_embedded(cfg, "train", root=tmp_path)
    fixed = load_embedded(cfg, "train", root=tmp_path, rebuild=True)
    assert torch.equal(fixed.audio, train.audio)  # rendering is deterministic


def _load_in_process(root):
    cfg = EmbeddedDataConfig(**SMALL)
    data = load_embedded(cfg, "all", root=root)
    return len(data), os.stat(os.path.join(root, cfg.key(), "clips.npz")).st_mtime_ns


def test_concurrent_processes_build_the_cache_once(tmp_path, multiprocess):
    results = multiprocess(_load_in_process, 2, str(tmp_path))
    assert results[0] == results[1]  # same clips, and the file the first built was not rebuilt


def test_embedded_config_validation():
    with pytest.raises(ValueError, match="collections"):
        EmbeddedDataConfig(collections=("jazz",))
    with pytest.raises(ValueError, match="clip_samples=99999"):
        EmbeddedDataConfig(clip_samples=99999, seconds_per_piece=1.0)
    with pytest.raises(ValueError, match="synth="):
        EmbeddedDataConfig(synth="midi")


@pytest.fixture
def fake_fluidsynth(tmp_path, monkeypatch):
    """A stand-in `fluidsynth` program that writes a 440 Hz tone where -F says."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    script = bin_dir / "fluidsynth"
    script.write_text(
        textwrap.dedent(f"""\
        #!{sys.executable}
        import sys, numpy as np, soundfile as sf
        args = sys.argv[1:]
        out, rate = args[args.index("-F") + 1], int(args[args.index("-r") + 1])
        t = np.arange(rate) / rate
        sf.write(out, np.stack([np.sin(2 * np.pi * 440 * t)] * 2, 1) * 0.3, rate)
        """)
    )
    script.chmod(script.stat().st_mode | stat.S_IEXEC)
    font = tmp_path / "gm.sf2"
    font.write_bytes(b"sf2")
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.setenv("VERGER_SOUNDFONT", str(font))
    return script


def test_fluidsynth_path_renders_and_resamples(tmp_path, fake_fluidsynth):
    assert fluidsynth_available() is not None
    assert EmbeddedDataConfig(synth="auto").resolved_synth() == "fluidsynth"
    midi = tmp_path / "x.mid"
    midi.write_bytes(b"MThd")
    audio = render_midi_fluidsynth(midi, sample_rate=8000, duration=0.5)
    assert audio.sample_rate == 8000 and audio.waveform.shape == (1, 4000)
    spectrum = np.abs(np.fft.rfft(audio.waveform[0].numpy()))
    assert abs(np.fft.rfftfreq(4000, 1 / 8000)[spectrum.argmax()] - 440) < 3


def test_fluidsynth_missing_is_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path))
    monkeypatch.delenv("VERGER_SOUNDFONT", raising=False)
    with pytest.raises(RuntimeError, match="synth='builtin'"):
        render_midi_fluidsynth(
            tmp_path / "x.mid", sample_rate=8000, executable=None, soundfont=None
        )


@pytest.fixture
def audio_folder(tmp_path):
    root = tmp_path / "fma_small"
    (root / "000").mkdir(parents=True)
    (root / "001").mkdir()
    rng = np.random.default_rng(0)
    for track, seconds in ((2, 1.0), (5, 0.6), (1042, 0.3)):
        folder = root / ("000" if track < 1000 else "001")
        stereo = 0.3 * rng.standard_normal((int(16000 * seconds), 2))
        sf.write(folder / f"{track:06d}.wav", stereo, 16000)
    (root / "000" / "000007.wav").write_bytes(b"not audio at all")
    meta = tmp_path / "tracks.csv"
    meta.write_text(
        ",track,track\n,genre_top,title\ntrack_id,,\n2,Folk,a\n5,Rock,b\n1042,Folk,c\n7,Rock,d\n"
    )
    return root, meta


def test_audio_folder_streams_resampled_labelled_clips(audio_folder):
    root, meta = audio_folder
    assert read_track_labels(meta) == {2: "Folk", 5: "Rock", 1042: "Folk", 7: "Rock"}
    data = AudioFolder(root, sample_rate=8000, clip_samples=2000, metadata=meta)
    assert data.classes == ["Folk", "Rock"]
    with pytest.warns(UserWarning, match=r"000007\.wav"):
        clips, labels = collect_clips(data)
    # 1.0 s -> 8000 samples -> 4 clips; 0.6 s -> 4800 -> 2 clips; 0.3 s -> 2400 -> 1 clip
    assert clips.shape == (7, 1, 2000)
    assert sorted(labels.tolist()) == [0] * 5 + [1] * 2
    with pytest.raises(AudioFileError, match=r"000007\.wav"):
        collect_clips(AudioFolder(root, sample_rate=8000, clip_samples=2000, strict=True))


def test_audio_folder_shards_files_over_workers(audio_folder):
    root, _ = audio_folder
    data = AudioFolder(root, sample_rate=8000, clip_samples=1000, min_peak=0.0)
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        single = sum(1 for _ in data)
        loader = torch.utils.data.DataLoader(data, batch_size=None, num_workers=2)
        assert sum(1 for _ in loader) == single


def test_flat_metadata_and_errors(tmp_path):
    flat = tmp_path / "m.csv"
    flat.write_text("track_id,genre\n3,Jazz\nx,Pop\n")
    assert read_track_labels(flat, "genre") == {3: "Jazz"}
    with pytest.raises(ValueError, match="track_id"):
        read_track_labels(flat, "mood")
    with pytest.raises(FileNotFoundError, match="no audio files"):
        AudioFolder(tmp_path, sample_rate=8000, clip_samples=100)
