"""Shared plumbing for the frozen-VAE adapters (see :class:`revq_ray.vae.base.FrozenVAE`)."""

from __future__ import annotations

import torch
from torch import nn

from revq_ray.vae.base import Posterior


def freeze(module: nn.Module) -> nn.Module:
    """Eval mode and no gradients: a frozen VAE never trains and never keeps dropout/batch-norm updates."""
    module.eval()
    module.requires_grad_(False)
    return module


class FrozenAdapter:
    """Base of every adapter: device moves, input checks, the non-Gaussian ``posterior`` error.

    Besides the protocol fields, adapters carry ``input_kind`` ("image", "mel" or "waveform"): what
    ``encode`` takes. Audio adapters also carry ``sample_rate`` and, for mel VAEs, ``front_end``
    (a :class:`revq_ray.vae.audio.MelFrontEnd`), so callers can turn audio files into inputs consistently.
    """

    spec: str
    modality: str
    input_kind: str
    input_shape: tuple[int, ...]
    latent_shape: tuple[int, ...]
    is_gaussian: bool
    sample_rate: int | None = None

    def __init__(self, module: nn.Module, device: torch.device | str = "cpu"):
        self.module = freeze(module.float())
        self.device = torch.device(device)
        self.module.to(self.device)

    def to(self, device: torch.device | str) -> FrozenAdapter:
        self.device = torch.device(device)
        self.module.to(self.device)
        for extra in self._extra_modules():
            extra.to(self.device)
        return self

    @torch.no_grad()
    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """Raw latents -> the VAE's output (see :class:`~revq_ray.vae.base.FrozenVAE`)."""
        return self.decode_differentiable(z)

    def decode_differentiable(self, z: torch.Tensor) -> torch.Tensor:
        """:meth:`decode` with autograd on (the weights stay frozen): what the decoder-sensitivity weights of
        ``model.weighting: decoder`` differentiate."""
        raise NotImplementedError(f"{type(self).__name__} does not implement decode_differentiable")

    def _extra_modules(self) -> list[nn.Module]:
        return []

    def _check_input(self, x: torch.Tensor, what: str = "encode") -> torch.Tensor:
        if x.dim() != len(self.input_shape) + 1 or x.shape[1] != self.input_shape[0]:
            raise ValueError(
                f"{self.spec}: {what} expects (B, {', '.join(map(str, self.input_shape))})-shaped "
                f"{self.input_kind} input (other sizes allowed where the VAE is convolutional); "
                f"got {tuple(x.shape)}"
            )
        return x.to(self.device, torch.float32)

    def _check_latent(self, z: torch.Tensor) -> torch.Tensor:
        if z.dim() != len(self.latent_shape) + 1 or z.shape[1] != self.latent_shape[0]:
            raise ValueError(
                f"{self.spec}: decode expects latents (B, {', '.join(map(str, self.latent_shape))}); "
                f"got {tuple(z.shape)}"
            )
        return z.to(self.device, torch.float32)

    def posterior(self, x: torch.Tensor) -> Posterior:
        raise NotImplementedError(
            f"{self.spec} is deterministic (is_gaussian=False): it has no posterior. GQ and the target-"
            "divergence regularizer need a Gaussian VAE: a diffusers AutoencoderKL/AutoencoderOobleck or a "
            "built-in one (python -m revq_ray.vae)."
        )

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(spec={self.spec!r}, modality={self.modality!r}, input={self.input_kind}"
            f"{list(self.input_shape)}, latent={list(self.latent_shape)}, gaussian={self.is_gaussian})"
        )
