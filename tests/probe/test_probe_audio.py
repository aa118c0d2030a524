"""WAV reading, resampling, and the log-mel / MFCC front end, against naive references."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from stethoscope.probe.audio import (
    MFCC,
    FrontEnd,
    LogMel,
    dct_matrix,
    mel_filterbank,
    read_wav,
    resample,
    write_wav,
)
from stethoscope.probe.errors import ProbeDataError


def _tone(freq, rate, seconds=0.5):
    t = np.arange(int(rate * seconds)) / rate
    return np.sin(2 * np.pi * freq * t)


def _peak_hz(wave, rate):
    spec = np.abs(np.fft.rfft(wave * np.hanning(len(wave))))
    return np.fft.rfftfreq(len(wave), 1 / rate)[spec.argmax()]


@pytest.mark.parametrize(
    ("dtype", "scale"),
    [(np.int16, 32767), (np.int32, 2**31 - 1), (np.float32, 1.0)],
)
def test_read_wav_scales_to_unit_range(tmp_path, wav_writer, dtype, scale):
    wave = 0.5 * _tone(440, 8000)
    path = wav_writer(tmp_path / "a.wav", (wave * scale).astype(dtype), 8000)
    got = read_wav(path)
    assert got.dtype == np.float32
    np.testing.assert_allclose(got, wave, atol=1e-4)


def test_read_wav_uint8_and_stereo(tmp_path, wav_writer):
    wave = 0.5 * _tone(300, 8000, 0.1)
    u8 = np.clip(wave * 128 + 128, 0, 255).astype(np.uint8)
    np.testing.assert_allclose(read_wav(wav_writer(tmp_path / "u8.wav", u8, 8000)), wave, atol=1 / 64)
    stereo = np.stack([wave + 0.1, wave - 0.1], axis=1).astype(np.float32)  # mean = wave
    np.testing.assert_allclose(read_wav(wav_writer(tmp_path / "st.wav", stereo, 8000)), wave, atol=1e-6)


def test_resampling_keeps_frequency_and_duration(tmp_path, wav_writer):
    path = wav_writer(tmp_path / "t.wav", (0.3 * _tone(1000, 44100)).astype(np.float32), 44100)
    got = read_wav(path, sample_rate=16000)
    assert len(got) == 8000  # 0.5 s at 16 kHz
    assert abs(_peak_hz(got, 16000) - 1000) < 5
    assert abs(_peak_hz(resample(got, 16000, 8000), 8000) - 1000) < 5


def test_write_then_read_round_trip(tmp_path):
    wave = (0.25 * _tone(200, 8000, 0.2)).astype(np.float32)
    write_wav(tmp_path / "w.wav", wave, 8000)
    np.testing.assert_allclose(read_wav(tmp_path / "w.wav"), wave, atol=1e-4)


def test_read_errors_name_the_file(tmp_path, wav_writer):
    with pytest.raises(ProbeDataError, match="does not exist"):
        read_wav(tmp_path / "nope.wav")
    (tmp_path / "junk.wav").write_bytes(b"RIFF....WAVEjunk")
    with pytest.raises(ProbeDataError, match=r"junk.wav.*as WAV"):
        read_wav(tmp_path / "junk.wav")
    wav_writer(tmp_path / "empty.wav", np.zeros(0, dtype=np.int16), 8000)
    with pytest.raises(ProbeDataError, match="holds no samples"):
        read_wav(tmp_path / "empty.wav")


def test_mel_filters_peak_at_increasing_centres():
    fb = mel_filterbank(16000, 512, 40)
    assert fb.shape == (40, 257) and (fb >= 0).all()
    peaks = fb.argmax(1)
    assert (np.diff(peaks) >= 0).all() and peaks[-1] > peaks[0]


def test_a_tone_lands_in_its_mel_band():
    lm = LogMel(16000, n_mels=40)
    fb = mel_filterbank(16000, lm.n_fft, 40)
    for freq in (300.0, 1200.0, 4000.0):
        out = lm(torch.from_numpy(_tone(freq, 16000)).float()[None])  # (1, T, 40)
        band = int(out[0].mean(0).argmax())
        bin_of = round(freq / (16000 / lm.n_fft))
        assert fb[band, bin_of] > 0  # the loudest band contains the tone's bin


def test_logmel_frames_and_mfcc_match_a_reference_dct():
    from scipy.fft import dct

    fe = FrontEnd(8000, n_mels=20, n_mfcc=8)
    wave = torch.randn(2, 2000)
    logmel = fe.logmel(wave)
    assert logmel.shape[1] == int(fe.logmel.frames(torch.tensor(2000)))
    mfcc = fe.mfcc(logmel)
    ref = dct(logmel.numpy(), type=2, norm="ortho", axis=-1)[..., :8]
    np.testing.assert_allclose(mfcc.numpy(), ref, atol=1e-4)
    assert torch.allclose(fe(wave), mfcc)
    assert np.allclose(dct_matrix(20, 20).T @ dct_matrix(20, 20), np.eye(20), atol=1e-5)  # orthonormal
    assert isinstance(fe.mfcc, MFCC)
