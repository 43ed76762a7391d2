"""Adapter for diffusers autoencoders: AutoencoderKL, AutoencoderDC, AutoencoderTiny (images) and
AutoencoderOobleck (audio, waveform input).

Conventions (checked against the installed diffusers source):
- Image VAEs take RGB in [-1, 1] and return [-1, 1]. That includes AutoencoderTiny, whose EncoderTiny maps
  [-1, 1] -> [0, 1] itself and whose DecoderTiny maps back. Our inputs are [0, 1], so x -> 2x - 1 on the way
  in and (y + 1) / 2, clamped, on the way out.
- Latents are **raw**: no ``scaling_factor`` / ``shift_factor``: revq-ray's per-element standardizer handles
  scale, and raw latents are what the decoder consumes.
- AutoencoderKL and AutoencoderOobleck are Gaussian (posterior mean / log-variance); DC-AE and Tiny are
  deterministic.
- AutoencoderOobleck takes a waveform (B, audio_channels, samples) in [-1, 1] at its ``sampling_rate``.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import torch

from revq_ray.vae._adapter import FrozenAdapter
from revq_ray.vae.base import Posterior

SUPPORTED_CLASSES = ("AutoencoderKL", "AutoencoderDC", "AutoencoderTiny", "AutoencoderOobleck")
GAUSSIAN_CLASSES = ("AutoencoderKL", "AutoencoderOobleck")
DEFAULT_IMAGE_SIZE = 256
DEFAULT_AUDIO_SECONDS = 10.0


def _resolve(source: str) -> tuple[str, str | None, dict[str, Any]]:
    """``source`` (a local dir or a hub id, optionally ``owner/name/subfolder``) -> (path_or_id, subfolder,
    config dict). A local dir may hold config.json itself or in ``vae/`` (a whole pipeline folder)."""
    local = Path(source).expanduser()
    if local.exists():
        if not local.is_dir():
            raise ValueError(f"diffusers:{source}: expected a directory holding config.json, got a file")
        for sub in (None, "vae"):
            cfg = local / sub / "config.json" if sub else local / "config.json"
            if cfg.is_file():
                return str(local), sub, json.loads(cfg.read_text())
        raise ValueError(f"diffusers:{source}: no config.json in the directory or its vae/ subfolder")
    parts = source.strip("/").split("/")
    if len(parts) < 2:
        raise ValueError(
            f"diffusers:{source}: not an existing directory and not a hub id (owner/name[/subfolder])"
        )
    repo_id, sub = "/".join(parts[:2]), "/".join(parts[2:]) or None
    from huggingface_hub import hf_hub_download

    errors = []
    for candidate in [sub] if sub else [None, "vae"]:
        try:
            path = hf_hub_download(repo_id, "config.json", subfolder=candidate)
            return repo_id, candidate, json.loads(Path(path).read_text())
        except Exception as err:  # offline, missing repo, missing file: report them all below
            errors.append(f"{candidate or '.'}: {type(err).__name__}: {err}")
    raise ValueError(
        f"diffusers:{source}: could not fetch config.json from the hub ({'; '.join(errors)}). Without "
        "internet, download the VAE elsewhere and pass its local directory: diffusers:/path/to/vae"
    )


class DiffusersVAE(FrozenAdapter):
    """A frozen diffusers autoencoder behind the :class:`~revq_ray.vae.base.FrozenVAE` protocol."""

    def __init__(
        self,
        source: str,
        device: torch.device | str = "cpu",
        image_size: int | None = None,
        audio_samples: int | None = None,
    ):
        import diffusers

        path, subfolder, config = _resolve(source)
        class_name = config.get("_class_name", "")
        if class_name not in SUPPORTED_CLASSES:
            raise ValueError(
                f"diffusers:{source}: config.json names _class_name={class_name!r}; supported: "
                f"{', '.join(SUPPORTED_CLASSES)}"
            )
        cls = getattr(diffusers, class_name)
        kwargs = {"subfolder": subfolder} if subfolder else {}
        # low_cpu_mem_usage=False: the default path wants `accelerate` and warns loudly without it.
        module = cls.from_pretrained(path, torch_dtype=torch.float32, low_cpu_mem_usage=False, **kwargs)
        super().__init__(module, device)
        self.spec = f"diffusers:{source}"
        self.class_name = class_name
        self.is_gaussian = class_name in GAUSSIAN_CLASSES
        if class_name == "AutoencoderOobleck":
            self._init_audio(audio_samples)
        else:
            self._init_image(image_size)

    # ------------------------------------------------------------------------------------------ shapes
    def _init_image(self, image_size: int | None) -> None:
        cfg = self.module.config
        self.modality, self.input_kind = "image", "image"
        in_ch = int(cfg.get("in_channels", 3))
        if in_ch != 3:
            raise ValueError(f"{self.spec}: in_channels={in_ch}; only RGB image VAEs are supported")
        blocks = cfg.get("block_out_channels") or cfg.get("encoder_block_out_channels") or [0]
        guess = 2 ** (len(blocks) - 1)
        # A tiny dry run confirms the factor and channel count whatever the config says.
        probe = 2 * guess
        z = self._encode_raw(torch.zeros(1, 3, probe, probe, device=self.device))
        latent_channels, h = int(z.shape[1]), int(z.shape[-1])
        if h == 0 or probe % h:
            raise ValueError(f"{self.spec}: could not infer the downsampling factor (probe {probe} -> {h})")
        self.factor = probe // h
        if image_size is None:
            sample = cfg.get("sample_size")
            sample = sample[0] if isinstance(sample, list | tuple) else sample
            image_size = int(sample) if sample else DEFAULT_IMAGE_SIZE
        if image_size % self.factor:
            raise ValueError(
                f"{self.spec}: image_size={image_size} must be a multiple of the VAE's downsampling factor "
                f"{self.factor}"
            )
        self.input_shape = (3, image_size, image_size)
        self.latent_shape = (latent_channels, image_size // self.factor, image_size // self.factor)

    def _init_audio(self, audio_samples: int | None) -> None:
        cfg = self.module.config
        self.modality, self.input_kind = "audio", "waveform"
        self.sample_rate = int(cfg.get("sampling_rate", 44100))
        self.factor = int(math.prod(cfg.get("downsampling_ratios", [2, 4, 4, 8, 8])))
        channels = int(cfg.get("audio_channels", 2))
        if audio_samples is None:
            audio_samples = (
                max(1, round(self.sample_rate * DEFAULT_AUDIO_SECONDS / self.factor)) * self.factor
            )
        if audio_samples % self.factor:
            raise ValueError(
                f"{self.spec}: audio_samples={audio_samples} must be a multiple of the hop {self.factor}"
            )
        z = self._encode_raw(torch.zeros(1, channels, 2 * self.factor, device=self.device))
        self.input_shape = (channels, audio_samples)
        self.latent_shape = (int(z.shape[1]), audio_samples // self.factor)

    # ------------------------------------------------------------------------------------------ encode
    @torch.no_grad()
    def _encode_raw(self, x: torch.Tensor) -> torch.Tensor:
        """Model-range input -> latents (posterior mean for Gaussian VAEs)."""
        out = self.module.encode(x)
        if self.class_name in GAUSSIAN_CLASSES:
            return out.latent_dist.mean
        return out.latents if self.class_name == "AutoencoderTiny" else out.latent

    def _to_model_range(self, x: torch.Tensor) -> torch.Tensor:
        return x * 2.0 - 1.0 if self.modality == "image" else x

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """Images (B, 3, H, W) in [0, 1], or waveforms (B, C, T) for Oobleck -> raw latents."""
        return self._encode_raw(self._to_model_range(self._check_input(x)))

    @torch.no_grad()
    def posterior(self, x: torch.Tensor) -> Posterior:
        if not self.is_gaussian:
            return super().posterior(x)
        dist = self.module.encode(self._to_model_range(self._check_input(x))).latent_dist
        return Posterior(mean=dist.mean, logvar=dist.logvar)

    def decode_differentiable(self, z: torch.Tensor) -> torch.Tensor:
        """Raw latents -> images in [0, 1] (clamped), or waveforms in [-1, 1] for Oobleck; differentiable
        (:meth:`decode` is this under no_grad)."""
        y = self.module.decode(self._check_latent(z)).sample
        if self.modality == "image":
            return ((y + 1.0) / 2.0).clamp(0.0, 1.0)
        return y.clamp(-1.0, 1.0)

    # ------------------------------------------------------------------------------ audio convenience
    def wave_to_input(self, wave_bt: torch.Tensor) -> torch.Tensor:
        """Oobleck: mono waveform (B, T) at ``sample_rate`` -> (B, audio_channels, T') with the mono signal
        copied to every channel and T' = T right-padded with zeros to a multiple of the hop."""
        if self.input_kind != "waveform":
            raise ValueError(
                f"{self.spec}: wave_to_input is for waveform VAEs; this one takes {self.input_kind}"
            )
        extra = (-wave_bt.shape[-1]) % self.factor
        wave_bt = torch.nn.functional.pad(wave_bt.float(), (0, extra)) if extra else wave_bt.float()
        return wave_bt[:, None].expand(-1, self.input_shape[0], -1).to(self.device)

    def output_to_wave(self, y: torch.Tensor, **_: Any) -> torch.Tensor:
        """Oobleck: decoded (B, audio_channels, T) -> mono (B, T) by channel mean."""
        return y.mean(dim=1)
