"""The frozen-autoencoder protocol every VAE adapter implements."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol, runtime_checkable

import torch


@dataclass
class Posterior:
    """A Gaussian posterior over latents: mean and log-variance, both (B, *latent_shape)."""

    mean: torch.Tensor
    logvar: torch.Tensor


@runtime_checkable
class FrozenVAE(Protocol):
    """A pre-trained autoencoder used frozen. Images: (B, 3, H, W) in [0, 1]. Audio: (B, n_mels, frames)
    normalized log-mel (see :mod:`revq_ray.vae.audio`)."""

    spec: str  # how it was named: "diffusers:<id|dir>", "taesd:<dir>", "builtin:<dir>"
    modality: str  # "image" or "audio"
    input_shape: tuple[int, ...]  # per-item input shape the VAE expects, e.g. (3, 64, 64)
    latent_shape: tuple[int, ...]  # per-item latent shape, e.g. (32, 8, 8)
    is_gaussian: bool  # True when posterior() is available

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """Inputs -> latents (the posterior mean for Gaussian VAEs)."""
        ...

    def posterior(self, x: torch.Tensor) -> Posterior:
        """Inputs -> posterior mean and log-variance. Raises for non-Gaussian VAEs."""
        ...

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """Latents -> inputs (images clamped to [0, 1])."""
        ...

    def to(self, device: torch.device | str) -> FrozenVAE: ...
