"""Built-in Gaussian VAEs in pure PyTorch: small enough to train on a CPU, and Gaussian so GQ and the
target-divergence regularizer have a posterior to work with.

- :class:`ImageConvVAE`: (3, S, S) in [0, 1] -> latent (C, S/8, S/8) through three stride-2 stages
  (pixel-unshuffle, then two strided convs).
- :class:`MelVAE`: normalized log-mel (n_mels, frames) -> latent (C, frames/4) through two stride-2 1D stages;
  its config carries the :class:`~revq_ray.vae.audio.MelFrontEnd` parameters, so audio files are always
  turned into mels the way the model was trained.

Both use ``PyTorchModelHubMixin``: ``save_pretrained(dir)`` writes ``config.json`` + ``model.safetensors``
and, through the ``_save_pretrained`` hook, ``revq_vae.json`` naming the class, which is what lets
``load_vae("builtin:<dir>")`` load either. The modules' ``decode`` returns the raw output (training needs
its gradient); the frozen adapter :class:`BuiltinVAE` clamps images to [0, 1].
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from huggingface_hub import PyTorchModelHubMixin
from torch import nn

from revq_ray.core.files import follow_umask
from revq_ray.vae._adapter import FrozenAdapter
from revq_ray.vae.audio import MelFrontEnd
from revq_ray.vae.base import Posterior

BUILTIN_FILE = "revq_vae.json"
LOGVAR_RANGE = (-30.0, 20.0)  # the usual clamp (diffusers' DiagonalGaussianDistribution): keeps exp() finite


def _groups(ch: int) -> int:
    return math.gcd(ch, 8)


class _Res(nn.Module):
    """Pre-norm residual block: x + conv(silu(gn(conv(silu(gn(x))))))."""

    def __init__(self, ch: int, dims: int):
        super().__init__()
        conv = nn.Conv2d if dims == 2 else nn.Conv1d
        self.body = nn.Sequential(
            nn.GroupNorm(_groups(ch), ch), nn.SiLU(), conv(ch, ch, 3, padding=1),
            nn.GroupNorm(_groups(ch), ch), nn.SiLU(), conv(ch, ch, 3, padding=1),
        )  # fmt: skip

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.body(x)


class _GaussianVAE(nn.Module):
    """Shared Gaussian encode/decode logic; subclasses build ``encoder`` (-> 2C channels) and ``decoder``."""

    modality: str
    encoder: nn.Module
    decoder: nn.Module

    def encode_dist(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Inputs -> (mean, logvar), each (B, *latent_shape)."""
        mean, logvar = self.encoder(x).chunk(2, dim=1)
        return mean, logvar.clamp(*LOGVAR_RANGE)

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """Inputs -> posterior mean."""
        return self.encode_dist(x)[0]

    def posterior(self, x: torch.Tensor) -> Posterior:
        mean, logvar = self.encode_dist(x)
        return Posterior(mean=mean, logvar=logvar)

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """Latents -> raw reconstruction (not clamped)."""
        return self.decoder(z)

    def forward(
        self, x: torch.Tensor, sample: bool = True
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """-> (reconstruction, mean, logvar); ``sample`` draws z = mean + std * eps (reparameterization)."""
        mean, logvar = self.encode_dist(x)
        z = mean + torch.randn_like(mean) * torch.exp(0.5 * logvar) if sample else mean
        return self.decode(z), mean, logvar

    def _save_pretrained(self, save_directory: Path) -> None:
        super()._save_pretrained(save_directory)  # model.safetensors (config.json is written by the mixin)
        info = {"class": type(self).__name__, "modality": self.modality, "format": 1}
        (Path(save_directory) / BUILTIN_FILE).write_text(json.dumps(info, indent=2) + "\n")
        follow_umask(save_directory)  # safetensors writes 0600 whatever the umask says


class ImageConvVAE(
    _GaussianVAE,
    PyTorchModelHubMixin,
    library_name="revq-ray",
    tags=["revq-ray", "vae"],
):
    """Convolutional Gaussian VAE for RGB images in [0, 1]: (3, S, S) -> (latent_channels, S/8, S/8).

    Args:
        image_size: training / default input size S (any multiple of 8 works: fully convolutional).
        width: channels at S/2; the S/4 and S/8 stages use 2 * width.
        latent_channels: C of the latent.
    """

    modality = "image"
    factor = 8

    def __init__(self, image_size: int = 64, width: int = 64, latent_channels: int = 8):
        super().__init__()
        if image_size % self.factor:
            raise ValueError(f"ImageConvVAE: image_size={image_size} must be a multiple of {self.factor}")
        self.image_size, self.width, self.latent_channels = int(image_size), int(width), int(latent_channels)
        w, w2 = width, 2 * width
        # CPU-friendly: no convolution runs at full resolution. Pixel-unshuffle folds 2x2 pixels into channels
        # on the way in and pixel-shuffle unfolds them on the way out (no checkerboard from strided deconvs).
        self.encoder = nn.Sequential(
            nn.PixelUnshuffle(2), nn.Conv2d(12, w, 3, padding=1), _Res(w, 2),         # S/2
            nn.Conv2d(w, w2, 3, stride=2, padding=1), _Res(w2, 2),                     # S/4
            nn.Conv2d(w2, w2, 3, stride=2, padding=1), _Res(w2, 2),                    # S/8
            nn.GroupNorm(_groups(w2), w2), nn.SiLU(), nn.Conv2d(w2, 2 * latent_channels, 3, padding=1),
        )  # fmt: skip
        self.decoder = nn.Sequential(
            nn.Conv2d(latent_channels, w2, 3, padding=1), _Res(w2, 2),                 # S/8
            nn.Upsample(scale_factor=2), nn.Conv2d(w2, w2, 3, padding=1), _Res(w2, 2),  # S/4
            nn.Upsample(scale_factor=2), nn.Conv2d(w2, w, 3, padding=1), _Res(w, 2),    # S/2
            nn.GroupNorm(_groups(w), w), nn.SiLU(), nn.Conv2d(w, 12, 3, padding=1), nn.PixelShuffle(2),
        )  # fmt: skip

    @property
    def input_shape(self) -> tuple[int, ...]:
        return (3, self.image_size, self.image_size)

    @property
    def latent_shape(self) -> tuple[int, ...]:
        s = self.image_size // self.factor
        return (self.latent_channels, s, s)


class MelVAE(
    _GaussianVAE,
    PyTorchModelHubMixin,
    library_name="revq-ray",
    tags=["revq-ray", "vae", "audio"],
):
    """1D-convolutional Gaussian VAE over normalized log-mel: (n_mels, frames) -> (latent_channels, frames/4).

    Args:
        n_mels: mel bins (must match ``front_end["n_mels"]``).
        frames: training / default input length in frames (a multiple of 4; any multiple of 4 works).
        width: channels of the 1D stages.
        latent_channels: C of the latent.
        front_end: :meth:`MelFrontEnd.config` kwargs the model was trained with (default: ``MelFrontEnd()``).
        vocoder: how its mels become waveforms by default: ``griffin-lim`` (None) or ``vocos:<dir-or-id>``
            (:mod:`revq_ray.vae.vocoder`; the front end must then be the vocoder's, ``front_end_for``).
    """

    modality = "audio"
    factor = 4

    def __init__(
        self,
        n_mels: int = 80,
        frames: int = 128,
        width: int = 256,
        latent_channels: int = 16,
        front_end: dict[str, Any] | None = None,
        vocoder: str | None = None,
    ):
        super().__init__()
        self.vocoder = vocoder
        self.front_end_config = dict(front_end) if front_end else MelFrontEnd(n_mels=n_mels).config()
        if int(self.front_end_config.get("n_mels", n_mels)) != n_mels:
            raise ValueError(
                f"MelVAE: n_mels={n_mels} differs from front_end n_mels={self.front_end_config['n_mels']}"
            )
        if frames % self.factor:
            raise ValueError(f"MelVAE: frames={frames} must be a multiple of {self.factor}")
        self.n_mels, self.frames = int(n_mels), int(frames)
        self.width, self.latent_channels = int(width), int(latent_channels)
        w = width
        self.encoder = nn.Sequential(
            nn.Conv1d(n_mels, w, 5, padding=2), _Res(w, 1),
            nn.Conv1d(w, w, 4, stride=2, padding=1), _Res(w, 1),
            nn.Conv1d(w, w, 4, stride=2, padding=1), _Res(w, 1),
            nn.GroupNorm(_groups(w), w), nn.SiLU(), nn.Conv1d(w, 2 * latent_channels, 3, padding=1),
        )  # fmt: skip
        self.decoder = nn.Sequential(
            nn.Conv1d(latent_channels, w, 3, padding=1), _Res(w, 1),
            nn.Upsample(scale_factor=2, mode="nearest"), nn.Conv1d(w, w, 3, padding=1), _Res(w, 1),
            nn.Upsample(scale_factor=2, mode="nearest"), nn.Conv1d(w, w, 3, padding=1), _Res(w, 1),
            nn.GroupNorm(_groups(w), w), nn.SiLU(), nn.Conv1d(w, n_mels, 5, padding=2),
        )  # fmt: skip

    def make_front_end(self) -> MelFrontEnd:
        return MelFrontEnd(**self.front_end_config)

    @property
    def input_shape(self) -> tuple[int, ...]:
        return (self.n_mels, self.frames)

    @property
    def latent_shape(self) -> tuple[int, ...]:
        return (self.latent_channels, self.frames // self.factor)


BUILTIN_CLASSES: dict[str, type[_GaussianVAE]] = {"ImageConvVAE": ImageConvVAE, "MelVAE": MelVAE}


def pad_frames(mel: torch.Tensor, multiple: int = 4, value: float = -1.0) -> torch.Tensor:
    """Right-pad the last (frame) axis of a normalized log-mel to a multiple of ``multiple`` with ``value``
    (-1 = the front end's silence floor)."""
    extra = (-mel.shape[-1]) % multiple
    return F.pad(mel, (0, extra), value=value) if extra else mel


class BuiltinVAE(FrozenAdapter):
    """A frozen built-in VAE loaded from a ``save_pretrained`` directory (``builtin:<dir>``)."""

    def __init__(
        self,
        directory: str | Path,
        device: torch.device | str = "cpu",
        image_size: int | None = None,
        audio_samples: int | None = None,
    ):
        directory = Path(directory).expanduser()
        info_path = directory / BUILTIN_FILE
        if not info_path.is_file():
            raise ValueError(
                f"builtin:{directory}: no {BUILTIN_FILE} there; a built-in VAE directory is written by "
                "`python -m revq_ray.vae --config configs/vae_*.yaml` (or model.save_pretrained(dir))"
            )
        info = json.loads(info_path.read_text())
        name = info.get("class")
        if name not in BUILTIN_CLASSES:
            raise ValueError(
                f"builtin:{directory}: unknown class {name!r} in {BUILTIN_FILE}; "
                f"known: {list(BUILTIN_CLASSES)}"
            )
        model = BUILTIN_CLASSES[name].from_pretrained(str(directory), strict=True)
        super().__init__(model, device)
        self.spec = f"builtin:{directory}"
        self.modality = model.modality
        self.is_gaussian = True
        self.latent_channels = model.latent_channels
        if isinstance(model, ImageConvVAE):
            self.input_kind = "image"
            size = model.image_size if image_size is None else int(image_size)
            if size % model.factor:
                raise ValueError(f"{self.spec}: image_size={size} must be a multiple of {model.factor}")
            self.input_shape = (3, size, size)
            self.latent_shape = (model.latent_channels, size // model.factor, size // model.factor)
        else:
            self.input_kind = "mel"
            self.vocoder_spec = getattr(model, "vocoder", None) or "griffin-lim"
            self.front_end = model.make_front_end().to(self.device)
            self.sample_rate = self.front_end.sample_rate
            frames = model.frames
            if audio_samples is not None:
                frames = self.front_end.num_frames(int(audio_samples))
                frames += (-frames) % model.factor
            self.input_shape = (model.n_mels, frames)
            self.latent_shape = (model.latent_channels, frames // model.factor)

    def _extra_modules(self) -> list[nn.Module]:
        return [self.front_end] if self.input_kind == "mel" else []

    @torch.no_grad()
    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """Images (B, 3, H, W) in [0, 1] or normalized log-mel (B, n_mels, frames) -> posterior mean."""
        return self.module.encode(self._prepare(x))

    @torch.no_grad()
    def posterior(self, x: torch.Tensor) -> Posterior:
        return self.module.posterior(self._prepare(x))

    def decode_differentiable(self, z: torch.Tensor) -> torch.Tensor:
        """Latents -> images clamped to [0, 1], or normalized log-mel (B, n_mels, 4 * L); differentiable
        (:meth:`decode` is this under no_grad)."""
        y = self.module.decode(self._check_latent(z))
        return y.clamp(0.0, 1.0) if self.input_kind == "image" else y

    def _prepare(self, x: torch.Tensor) -> torch.Tensor:
        x = self._check_input(x)
        factor = self.module.factor
        if any(s % factor for s in x.shape[2:]):
            raise ValueError(
                f"{self.spec}: input spatial/time sizes {tuple(x.shape[2:])} must be multiples of {factor}"
            )
        return x

    # ------------------------------------------------------------------------------ audio convenience
    @torch.no_grad()
    def wave_to_input(self, wave_bt: torch.Tensor) -> torch.Tensor:
        """Mel VAEs: waveform (B, T) at ``sample_rate`` -> normalized log-mel (B, n_mels, frames), frames
        right-padded with silence to a multiple of 4."""
        if self.input_kind != "mel":
            raise ValueError(f"{self.spec}: wave_to_input is for mel VAEs; this one takes {self.input_kind}")
        return pad_frames(self.front_end(wave_bt.to(self.device)), self.module.factor)

    @torch.no_grad()
    def output_to_wave(self, mel: torch.Tensor, n_iter: int = 32, length: int | None = None) -> torch.Tensor:
        """Mel VAEs: decoded normalized log-mel -> waveform by Griffin-Lim (for listening)."""
        if self.input_kind != "mel":
            raise ValueError(
                f"{self.spec}: output_to_wave is for mel VAEs; this one outputs {self.input_kind}"
            )
        return self.front_end.mel_to_wave(mel, n_iter=n_iter, length=length)
