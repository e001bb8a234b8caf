import numpy as np
import pytest
import torch

from verger.music_guidance.audio import (
    Audio,
    AudioFileError,
    log_mel,
    read_audio,
    resample,
    write_wav,
)


def test_wav_round_trip(tmp_path, sine):
    path = write_wav(tmp_path / "a.wav", sine)
    back = read_audio(path)
    assert back.sample_rate == 8000 and back.waveform.shape == (1, 512)
    assert float((back.waveform - sine.waveform).abs().max()) < 1.0 / 32767 + 1e-6  # 16-bit PCM


def test_corrupt_or_missing_wav_is_a_clear_error(tmp_path):
    bad = tmp_path / "bad.wav"
    bad.write_bytes(b"RIFF\x00\x00\x00\x00WAVEjunkjunkjunk")
    with pytest.raises(AudioFileError, match=r"bad\.wav: not a readable audio file"):
        read_audio(bad)
    with pytest.raises(AudioFileError, match="no such audio file"):
        read_audio(tmp_path / "missing.wav")


def test_resample_keeps_a_sine_at_its_frequency():
    sr, f = 16000, 1000.0
    t = torch.arange(sr) / sr
    audio = Audio(torch.sin(2 * torch.pi * f * t).unsqueeze(0), sr)
    down = resample(audio, 8000)
    assert down.sample_rate == 8000 and down.num_samples == 8000
    expected = torch.sin(2 * torch.pi * f * torch.arange(8000) / 8000)
    middle = slice(200, 7800)  # away from the edges of the finite filter
    assert float((down.waveform[0, middle] - expected[middle]).abs().max()) < 0.02
    spectrum = np.abs(np.fft.rfft(down.waveform[0].numpy()))
    assert int(spectrum.argmax()) == 1000  # 1 Hz bins over one second


def test_log_mel_peaks_in_the_band_of_a_sine():
    sr = 8000
    t = torch.arange(4096) / sr
    low = log_mel(torch.sin(2 * torch.pi * 300 * t), sr, n_mels=32).mean(-1)
    high = log_mel(torch.sin(2 * torch.pi * 3000 * t), sr, n_mels=32).mean(-1)
    assert int(low.argmax()) < int(high.argmax())
    assert log_mel(torch.sin(2 * torch.pi * 300 * t), sr, n_mels=32, hop=128).shape == (
        32,
        4096 // 128 + 1,
    )


def test_channels_mapping(sine):
    stereo = sine.with_channels(2)
    assert stereo.channels == 2 and torch.equal(stereo.with_channels(1).waveform, sine.waveform)
