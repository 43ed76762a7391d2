"""Audio front end: waveform <-> normalized log-mel spectrogram, file reading and fixed-length crops.

The published audio setting (METHODS.md, "Audio") is 22,050 Hz, n_fft 1024, hop 256, 80 mels. The mel
filterbank follows the HiFi-GAN convention by default (magnitude spectrogram, Slaney mel scale and area
norm, f_max 8 kHz); ``mel_scale="htk", norm=None, f_max=None`` is Vocos' convention, which
:func:`revq_ray.vae.vocoder.front_end_for` sets up from a Vocos config so its vocoder can read our mels.

Normalization uses **fixed constants**, never data statistics, so that every file, every worker and every
later run map audio to the same numbers::

    logmel = ln(max(mel, log_floor))                      # log_floor = 1e-5  ->  logmel >= -11.51
    x = (logmel - center) / half_range                    # center, half_range from [log_floor, log_max]
    center = (ln(log_floor) + log_max) / 2 = -4.756       # log_max = 2.0 (a full-scale tone peaks near it)
    half_range = (log_max - ln(log_floor)) / 2 = 6.756

so silence maps to exactly -1 and the loudest bins land near +1. Measured on the shared speech prompts
(peak amplitude ~0.7): mean -0.07, 1st/99th percentiles -0.79 / +0.75, max +0.94. Real speech rarely exceeds
+1; nothing is clipped on the loud side, so values slightly above 1 are possible.

Reading uses soundfile (torchaudio 2.11's own ``load``/``save`` need torchcodec); torchaudio provides only
transforms (MelSpectrogram, resample, InverseMelScale, GriffinLim).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

AUDIO_EXTENSIONS = (".wav", ".flac", ".ogg", ".mp3", ".aiff", ".aif")


class MelFrontEnd(nn.Module):
    """Waveform (B, T) or (T,) in [-1, 1] -> normalized log-mel (B, n_mels, 1 + T // hop) or (n_mels, frames).

    ``config()`` returns the constructor kwargs (JSON-able) so a saved model can rebuild the exact front end.
    """

    def __init__(
        self,
        sample_rate: int = 22050,
        n_fft: int = 1024,
        hop: int = 256,
        n_mels: int = 80,
        win_length: int | None = None,
        f_min: float = 0.0,
        f_max: float | None = 8000.0,
        log_floor: float = 1e-5,
        log_max: float = 2.0,
        mel_scale: str = "slaney",
        norm: str | None = "slaney",
    ):
        super().__init__()
        import torchaudio

        if hop <= 0 or n_fft <= 0 or n_mels <= 0:
            raise ValueError(f"MelFrontEnd: hop={hop}, n_fft={n_fft}, n_mels={n_mels} must all be positive")
        if f_max is not None and f_max > sample_rate / 2:
            raise ValueError(f"MelFrontEnd: f_max={f_max} is above Nyquist ({sample_rate / 2}); lower f_max")
        if mel_scale not in ("slaney", "htk") or norm not in ("slaney", None):
            raise ValueError(
                f"MelFrontEnd: mel_scale={mel_scale!r} (slaney or htk) / norm={norm!r} (slaney or None)"
            )
        if not 0 < log_floor < math.exp(log_max):
            raise ValueError(f"MelFrontEnd: need 0 < log_floor={log_floor} < exp(log_max={log_max})")
        self.sample_rate = int(sample_rate)
        self.n_fft = int(n_fft)
        self.hop = int(hop)
        self.n_mels = int(n_mels)
        self.win_length = int(win_length or n_fft)
        self.f_min = float(f_min)
        self.f_max = None if f_max is None else float(f_max)
        self.log_floor = float(log_floor)
        self.log_max = float(log_max)
        self.mel_scale, self.norm = mel_scale, norm
        log_min = math.log(self.log_floor)
        self.center = (log_min + self.log_max) / 2
        self.half_range = (self.log_max - log_min) / 2
        self.mel = torchaudio.transforms.MelSpectrogram(
            sample_rate=self.sample_rate,
            n_fft=self.n_fft,
            win_length=self.win_length,
            hop_length=self.hop,
            f_min=self.f_min,
            f_max=self.f_max,
            n_mels=self.n_mels,
            power=1.0,
            norm=self.norm,
            mel_scale=self.mel_scale,
            center=True,
            pad_mode="reflect",
        )

    def config(self) -> dict[str, Any]:
        """Constructor kwargs, JSON-able: ``MelFrontEnd(**fe.config())`` rebuilds the same front end."""
        return {
            "sample_rate": self.sample_rate,
            "n_fft": self.n_fft,
            "hop": self.hop,
            "n_mels": self.n_mels,
            "win_length": self.win_length,
            "f_min": self.f_min,
            "f_max": self.f_max,
            "log_floor": self.log_floor,
            "log_max": self.log_max,
            "mel_scale": self.mel_scale,
            "norm": self.norm,
        }

    def num_frames(self, n_samples: int) -> int:
        """Frames produced for ``n_samples`` samples (centered STFT): ``1 + n_samples // hop``."""
        return 1 + int(n_samples) // self.hop

    def normalize(self, logmel: torch.Tensor) -> torch.Tensor:
        return (logmel - self.center) / self.half_range

    def denormalize(self, x: torch.Tensor) -> torch.Tensor:
        """Normalized log-mel -> linear mel magnitude (the inverse of ``forward`` up to the floor)."""
        return torch.exp(x * self.half_range + self.center)

    def forward(self, wave: torch.Tensor) -> torch.Tensor:
        if wave.dim() not in (1, 2):
            raise ValueError(f"MelFrontEnd expects a waveform (T,) or (B, T); got shape {tuple(wave.shape)}")
        mel = self.mel(wave.float())
        return self.normalize(torch.log(mel.clamp(min=self.log_floor)))

    @torch.no_grad()
    def mel_to_wave(self, mel: torch.Tensor, n_iter: int = 32, length: int | None = None) -> torch.Tensor:
        """Normalized log-mel (n_mels, frames) or (B, n_mels, frames) -> waveform, by Griffin-Lim.

        A dependency-free fallback vocoder for listening; quality is far below a neural vocoder.
        ``length`` (samples) defaults to ``(frames - 1) * hop``, the inverse of :meth:`num_frames`.
        """
        import torchaudio

        if mel.shape[-2] != self.n_mels:
            raise ValueError(f"mel_to_wave: expected {self.n_mels} mel bins, got shape {tuple(mel.shape)}")
        frames = mel.shape[-1]
        inv = torchaudio.transforms.InverseMelScale(
            n_stft=self.n_fft // 2 + 1,
            n_mels=self.n_mels,
            sample_rate=self.sample_rate,
            f_min=self.f_min,
            f_max=self.f_max,
            norm=self.norm,
            mel_scale=self.mel_scale,
        ).to(mel.device)
        gl = torchaudio.transforms.GriffinLim(
            n_fft=self.n_fft,
            n_iter=n_iter,
            win_length=self.win_length,
            hop_length=self.hop,
            power=1.0,
            length=length if length is not None else (frames - 1) * self.hop,
        ).to(mel.device)
        spec = inv(self.denormalize(mel.float()))
        return gl(spec).clamp(-1.0, 1.0)


def mel_to_wave(
    mel: torch.Tensor, front_end: MelFrontEnd, n_iter: int = 32, length: int | None = None
) -> torch.Tensor:
    """Normalized log-mel -> waveform, InverseMelScale + GriffinLim (see :meth:`MelFrontEnd.mel_to_wave`)."""
    return front_end.mel_to_wave(mel, n_iter=n_iter, length=length)


def load_audio(path: str | Path, target_sr: int) -> tuple[torch.Tensor, int]:
    """Read an audio file -> (mono float32 waveform (T,), target_sr). Channels are averaged; resampled with
    ``torchaudio.functional.resample`` when the file's rate differs. Raises on unreadable files (callers
    that walk folders catch, skip and count)."""
    import soundfile as sf
    import torchaudio

    data, sr = sf.read(str(path), dtype="float32", always_2d=True)  # (T, C)
    wave = torch.from_numpy(np.ascontiguousarray(data.mean(axis=1)))
    if sr != target_sr:
        wave = torchaudio.functional.resample(wave, int(sr), int(target_sr))
    return wave, int(target_sr)


def save_wav(path: str | Path, wave: torch.Tensor | np.ndarray, sample_rate: int) -> Path:
    """Write a mono waveform (T,) in [-1, 1] as 16-bit PCM WAV with soundfile."""
    import soundfile as sf

    if isinstance(wave, torch.Tensor):
        wave = wave.detach().float().cpu().numpy()
    wave = np.clip(np.asarray(wave, dtype=np.float32).reshape(-1), -1.0, 1.0)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    sf.write(str(path), wave, int(sample_rate), subtype="PCM_16")
    return path


def crop_or_pad(
    wave: torch.Tensor, n_samples: int, offset: int | None = 0, generator: torch.Generator | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Fixed-length view of a waveform (T,) -> (wave (n_samples,), mask (n_samples,) bool).

    Longer inputs are cropped at ``offset`` (``None``: a random offset drawn from ``generator``); shorter
    ones are zero-padded at the end. ``mask`` is True on real samples, False on padding.
    """
    if wave.dim() != 1:
        raise ValueError(f"crop_or_pad expects a mono waveform (T,); got shape {tuple(wave.shape)}")
    if n_samples <= 0:
        raise ValueError(f"crop_or_pad: n_samples={n_samples} must be positive")
    t = wave.shape[0]
    if t >= n_samples:
        if offset is None:
            offset = int(torch.randint(0, t - n_samples + 1, (1,), generator=generator))
        offset = max(0, min(int(offset), t - n_samples))
        return wave[offset : offset + n_samples], torch.ones(n_samples, dtype=torch.bool, device=wave.device)
    out = torch.zeros(n_samples, dtype=wave.dtype, device=wave.device)
    out[:t] = wave
    mask = torch.zeros(n_samples, dtype=torch.bool, device=wave.device)
    mask[:t] = True
    return out, mask


def frame_mask(sample_mask: torch.Tensor, hop: int) -> torch.Tensor:
    """Sample mask (..., T) -> frame mask (..., 1 + T // hop): a frame is valid when its center sample is."""
    centers = torch.arange(0, sample_mask.shape[-1] + 1, hop, device=sample_mask.device)
    centers = centers.clamp(max=sample_mask.shape[-1] - 1)
    return sample_mask[..., centers]


def list_audio_files(root: str | Path) -> list[Path]:
    """All audio files under ``root`` (recursive, sorted), by extension."""
    root = Path(root)
    if root.is_file():
        return [root]
    return sorted(p for p in root.rglob("*") if p.suffix.lower() in AUDIO_EXTENSIONS and p.is_file())
