"""Per-element standardization of VAE latents, saved with the model as buffers."""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn

from revq_ray.core.stats import RunningStats


class Standardizer(nn.Module):
    """``(z - mean) / std`` per element of the latent.

    One mean and std for each of the latent's elements (e.g. the 2,048 of a 32x8x8 latent)."""

    def __init__(self, latent_shape: tuple[int, ...] | list[int], eps: float = 1e-6):
        super().__init__()
        self.latent_shape = tuple(int(s) for s in latent_shape)
        self.eps = eps
        self.register_buffer("mean", torch.zeros(self.latent_shape))
        self.register_buffer("std", torch.ones(self.latent_shape))

    @torch.no_grad()
    def set_stats(self, stats: RunningStats) -> Standardizer:
        if stats.shape != self.latent_shape:
            raise ValueError(f"stats shape {stats.shape} != latent shape {self.latent_shape}")
        if stats.count < 2:
            raise ValueError(f"need at least 2 latents to fit a standardizer, got {stats.count}")
        self.mean.copy_(stats.mean.to(self.mean.dtype))
        self.std.copy_(stats.std.clamp_min(self.eps).to(self.std.dtype))
        return self

    @torch.no_grad()
    def fit(self, batches: Iterable[torch.Tensor]) -> RunningStats:
        """Fit from a stream of (B, *latent_shape) batches; returns the merged statistics."""
        stats = RunningStats(self.latent_shape)
        for b in batches:
            stats.update(b)
        self.set_stats(stats)
        return stats

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return (z - self.mean) / self.std

    def inverse(self, z_std: torch.Tensor) -> torch.Tensor:
        return z_std * self.std + self.mean
