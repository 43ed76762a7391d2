"""Per-element standardization of VAE latents, saved with the model as buffers."""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn

from revq_ray.core.stats import RunningStats


class Standardizer(nn.Module):
    """``(z - mean) / std`` per element of the latent, times ``sqrt(channel_weight)`` when ``weighted``.

    One mean and std for each of the latent's elements (e.g. the 2,048 of a 32x8x8 latent). A weighted
    standardizer also scales each channel by the square root of its weight (mean 1), so that squared distances
    in its units (the code search, the codebook and rectifier losses, the latent MSE) weigh channel c by
    ``channel_weight[c]``: with the decoder's sensitivity as the weights (``model.weighting: decoder``) they
    approximate the squared error of the decoded output instead of treating every channel alike."""

    #: smallest channel weight kept (relative to the mean of 1): an insensitive channel still round-trips
    #: exactly through :meth:`inverse` (no division by ~0).
    MIN_WEIGHT = 1e-3

    def __init__(self, latent_shape: tuple[int, ...] | list[int], eps: float = 1e-6, weighted: bool = False):
        super().__init__()
        self.latent_shape = tuple(int(s) for s in latent_shape)
        self.eps = eps
        self.weighted = weighted
        self.register_buffer("mean", torch.zeros(self.latent_shape))
        self.register_buffer("std", torch.ones(self.latent_shape))
        if weighted:
            self.register_buffer("channel_weight", torch.ones(self.latent_shape[0]))

    @torch.no_grad()
    def set_channel_weights(self, weights: torch.Tensor) -> torch.Tensor:
        """Set the per-channel weights (any positive scale; stored normalized to mean 1, floored at
        :attr:`MIN_WEIGHT`); returns them."""
        if not self.weighted:
            raise RuntimeError("this standardizer was built unweighted (model.weighting: none)")
        self.channel_weight.copy_(
            self.normalize_weights(weights, self.latent_shape[0]).to(self.channel_weight)
        )
        return self.channel_weight

    @classmethod
    def normalize_weights(cls, weights: torch.Tensor, channels: int) -> torch.Tensor:
        """Checked weights, mean 1, floored at :attr:`MIN_WEIGHT` -> (C,) float64 (what is stored)."""
        w = torch.as_tensor(weights, dtype=torch.float64).flatten()
        if w.numel() != channels or not bool(torch.isfinite(w).all()) or bool((w < 0).any()):
            raise ValueError(f"channel weights must be {channels} finite values >= 0, got {tuple(w.shape)}")
        if float(w.sum()) <= 0:
            raise ValueError("channel weights are all zero: the decoder ignores every channel?")
        w = (w / w.mean()).clamp_min(cls.MIN_WEIGHT)
        return w / w.mean()

    def _scale(self) -> torch.Tensor:
        # (C, 1, ..., 1): broadcasts over the spatial / time dims
        w = self.channel_weight.sqrt()
        return w.reshape(-1, *([1] * (len(self.latent_shape) - 1)))

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
        z_std = (z - self.mean) / self.std
        return z_std * self._scale() if self.weighted else z_std

    def inverse(self, z_std: torch.Tensor) -> torch.Tensor:
        if self.weighted:
            z_std = z_std / self._scale()
        return z_std * self.std + self.mean
