"""WAV input and a classical front end (log-mel, MFCC), without torchaudio.

Reading uses ``scipy.io.wavfile`` (PCM 8/16/24/32-bit and float WAVs), mixes channels to mono, scales
integers to [-1, 1] and resamples with a polyphase filter. The front end is plain torch: an STFT, a
Slaney-style mel filterbank built here, a log, and an orthonormal DCT-II for the cepstrum, so a baseline
representation exists for any audio set without extra packages.
"""

from __future__ import annotations

import math
import warnings
from functools import lru_cache
from math import gcd
from pathlib import Path

import numpy as np
import torch

from stethoscope.probe.errors import ProbeDataError


def wav_info(path: str | Path) -> tuple[int, int]:
    """(sample_rate, n_samples) of a WAV file, reading as little as scipy allows.

    Raises:
        ProbeDataError: missing or unreadable file, naming it.
    """
    rate, data = _read_raw(path, mmap=True)
    return rate, int(data.shape[0])


def _read_raw(path: str | Path, mmap: bool = False):
    from scipy.io import wavfile

    path = Path(path)
    if not path.is_file():
        raise ProbeDataError(f"audio file {str(path)!r} does not exist (check the manifest's path column)")
    try:
        with warnings.catch_warnings():  # unknown chunks (LIST, bext, ...) are normal in real WAVs
            warnings.simplefilter("ignore", wavfile.WavFileWarning)
            try:
                return wavfile.read(path, mmap=mmap)
            except ValueError:
                if not mmap:
                    raise
                return wavfile.read(path, mmap=False)  # e.g. 24-bit PCM cannot be memory-mapped
    except Exception as exc:  # scipy raises ValueError, OSError, struct.error, ...
        raise ProbeDataError(
            f"cannot read audio file {str(path)!r} as WAV ({type(exc).__name__}: {exc}); "
            "convert it to PCM or float WAV (e.g. `ffmpeg -i in -ar 16000 out.wav`)"
        ) from None


def read_wav(path: str | Path, sample_rate: int | None = None) -> np.ndarray:
    """Mono float32 waveform in [-1, 1], resampled to ``sample_rate`` when given.

    Args:
        path: a WAV file.
        sample_rate: target rate in Hz; None keeps the file's rate.

    Raises:
        ProbeDataError: missing, unreadable or empty file.
    """
    rate, data = _read_raw(path)
    data = np.asarray(data)
    if data.size == 0:
        raise ProbeDataError(f"audio file {str(path)!r} holds no samples; remove it from the manifest")
    if data.dtype == np.uint8:  # 8-bit WAV is unsigned, centred on 128
        wave = (data.astype(np.float32) - 128.0) / 128.0
    elif np.issubdtype(data.dtype, np.integer):
        wave = data.astype(np.float32) / float(-np.iinfo(data.dtype).min)
    else:
        wave = data.astype(np.float32)
    if wave.ndim == 2:  # (n_samples, channels)
        wave = wave.mean(axis=1)
    if sample_rate is not None and sample_rate != rate:
        wave = resample(wave, rate, sample_rate)
    return np.ascontiguousarray(wave, dtype=np.float32)


def resample(wave: np.ndarray, orig_rate: int, new_rate: int) -> np.ndarray:
    """Polyphase resampling (anti-aliased) from ``orig_rate`` to ``new_rate``."""
    from scipy.signal import resample_poly

    g = gcd(int(orig_rate), int(new_rate))
    return resample_poly(wave, int(new_rate) // g, int(orig_rate) // g).astype(np.float32)


def write_wav(path: str | Path, wave: np.ndarray, sample_rate: int) -> None:
    """Write a mono waveform as 16-bit PCM, clipping to [-1, 1]."""
    from scipy.io import wavfile

    pcm = (np.clip(wave, -1.0, 1.0) * 32767.0).round().astype(np.int16)
    wavfile.write(Path(path), int(sample_rate), pcm)


def _hz_to_mel(f):
    """Slaney mel scale: linear below 1 kHz, logarithmic above (librosa's default)."""
    f = np.asarray(f, dtype=np.float64)
    mel = f / (200.0 / 3)
    log_part = 15.0 + np.log(np.maximum(f, 1e-10) / 1000.0) / (math.log(6.4) / 27.0)
    return np.where(f >= 1000.0, log_part, mel)


def _mel_to_hz(m):
    m = np.asarray(m, dtype=np.float64)
    lin = m * (200.0 / 3)
    log_part = 1000.0 * np.exp((m - 15.0) * (math.log(6.4) / 27.0))
    return np.where(m >= 15.0, log_part, lin)


@lru_cache(maxsize=16)
def mel_filterbank(sample_rate: int, n_fft: int, n_mels: int, fmin: float = 0.0, fmax: float | None = None):
    """(n_mels, n_fft // 2 + 1) triangular filters, area-normalised (Slaney), as a float32 array."""
    fmax = sample_rate / 2 if fmax is None else fmax
    freqs = np.linspace(0, sample_rate / 2, n_fft // 2 + 1)
    edges = _mel_to_hz(np.linspace(_hz_to_mel(fmin), _hz_to_mel(fmax), n_mels + 2))
    lower, centre, upper = edges[:-2, None], edges[1:-1, None], edges[2:, None]
    rising = (freqs[None] - lower) / (centre - lower)
    falling = (upper - freqs[None]) / (upper - centre)
    fb = np.maximum(0.0, np.minimum(rising, falling))
    fb *= 2.0 / (upper - lower)  # equal area per filter
    return fb.astype(np.float32)


@lru_cache(maxsize=16)
def dct_matrix(n_in: int, n_out: int) -> np.ndarray:
    """(n_in, n_out) orthonormal DCT-II basis: ``logmel @ dct`` gives the first ``n_out`` cepstra."""
    n = np.arange(n_in)[:, None]
    k = np.arange(n_out)[None, :]
    basis = np.cos(math.pi / n_in * (n + 0.5) * k) * math.sqrt(2.0 / n_in)
    basis[:, 0] /= math.sqrt(2.0)
    return basis.astype(np.float32)


class LogMel(torch.nn.Module):
    """Waveform batch (B, S) -> log-mel frames (B, T, n_mels).

    Args:
        sample_rate: Hz of the input.
        n_mels: mel bands.
        win_ms, hop_ms: analysis window and hop (25 ms / 10 ms is the speech convention).
        eps: floor inside the log, so silence stays finite.
    """

    def __init__(
        self,
        sample_rate: int = 16000,
        n_mels: int = 64,
        win_ms: float = 25.0,
        hop_ms: float = 10.0,
        eps: float = 1e-6,
    ):
        super().__init__()
        self.win = max(8, round(sample_rate * win_ms / 1000))
        self.hop = max(1, round(sample_rate * hop_ms / 1000))
        self.n_fft = 1 << (self.win - 1).bit_length()
        self.eps = eps
        self.register_buffer("window", torch.hann_window(self.win), persistent=False)
        fb = torch.from_numpy(mel_filterbank(sample_rate, self.n_fft, n_mels))
        self.register_buffer("fb", fb.T.contiguous(), persistent=False)  # (F, n_mels)

    def frames(self, n_samples: torch.Tensor) -> torch.Tensor:
        """Number of frames for waveforms of ``n_samples`` samples (center=True framing)."""
        return n_samples // self.hop + 1

    def forward(self, wave: torch.Tensor) -> torch.Tensor:
        # float32 inside whatever the model's dtype (no half-precision STFT on CPU); output in the input's
        spec = torch.stft(
            wave.float(),
            self.n_fft,
            self.hop,
            self.win,
            self.window.float(),
            center=True,
            return_complex=True,
        )  # (B, F, T)
        power = spec.real.square() + spec.imag.square()
        mel = torch.matmul(power.transpose(1, 2), self.fb.float())  # (B, T, n_mels)
        return torch.log(mel + self.eps).to(wave.dtype if wave.is_floating_point() else torch.float32)


class MFCC(torch.nn.Module):
    """Log-mel frames (B, T, n_mels) -> cepstra (B, T, n_mfcc) with an orthonormal DCT-II."""

    def __init__(self, n_mels: int = 64, n_mfcc: int = 20):
        super().__init__()
        self.register_buffer("dct", torch.from_numpy(dct_matrix(n_mels, n_mfcc)), persistent=False)

    def forward(self, logmel: torch.Tensor) -> torch.Tensor:
        return torch.matmul(logmel, self.dct.to(logmel.dtype))


class FrontEnd(torch.nn.Module):
    """The classical baseline as a module with two probe-able layers, ``logmel`` and ``mfcc``.

    Being an ``nn.Module`` with named children, it goes through the same hooks, pooling, storage and
    probes as any backbone, and appears in ``metrics.csv`` as rows ``frontend:logmel`` / ``frontend:mfcc``.
    """

    def __init__(
        self,
        sample_rate: int = 16000,
        n_mels: int = 64,
        n_mfcc: int = 20,
        win_ms: float = 25.0,
        hop_ms: float = 10.0,
    ):
        super().__init__()
        self.logmel = LogMel(sample_rate, n_mels, win_ms, hop_ms)
        self.mfcc = MFCC(n_mels, n_mfcc)

    def forward(self, wave: torch.Tensor) -> torch.Tensor:
        return self.mfcc(self.logmel(wave))
