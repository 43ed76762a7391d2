"""Token layout: standardized latents <-> tokens.

``contiguous`` (ReVQ's): a latent of shape (C, H, W) (images) or (C, L) (audio) is flattened in C-major order
and cut into T contiguous tokens of d = C*H*W / T values. With C=32, H=W=8 and T=512 a token is a 1x4
half-row of one channel. Splitting along channels is what ReVQ calls channel multi-group quantization. Every
channel gets the same share of the bits.

``position``: a token is d channels at one spatial position (T = positions x P, d = C / P). Channel j of
``channel_order`` goes to group j mod P, so with the order sorted by how much the decoder cares about each
channel (``model.weighting: decoder``), every group holds an equal share of the important channels and its
codebook spends its bits on them. Why: a decoder may care about a few channels far more than the rest (taef2:
4 of 32 channels carry 91% of diag(J^T J)); the contiguous layout gives them 1/8 of the bits.
"""

from __future__ import annotations

import math

import torch


def channel_order_for(weights: torch.Tensor) -> torch.Tensor:
    """The position layout's channel order for (stored, normalized) channel weights: decreasing weight,
    ties in channel order -> (C,) int64."""
    return torch.argsort(weights.detach().cpu().double(), descending=True, stable=True)


def valid_token_counts(latent_numel: int) -> list[int]:
    """All T that divide the latent size (the valid values of ``model.quantizer.tokens``)."""
    return [t for t in range(1, latent_numel + 1) if latent_numel % t == 0]


class TokenLayout:
    """Maps ``z_b*`` (any latent shape) to ``tokens_btd`` and back; a pure reshape, so exactly invertible."""

    def __init__(self, latent_shape: tuple[int, ...] | list[int], tokens: int, kind: str = "contiguous"):
        self.latent_shape = tuple(int(s) for s in latent_shape)
        if len(self.latent_shape) not in (2, 3) or min(self.latent_shape) < 1:
            raise ValueError(
                f"latent_shape={self.latent_shape}: expected (C, H, W) for images or (C, L) for audio"
            )
        self.numel = math.prod(self.latent_shape)
        if tokens < 1 or self.numel % tokens:
            valid = valid_token_counts(self.numel)
            raise ValueError(
                f"model.quantizer.tokens={tokens} does not divide the latent size {self.numel} "
                f"(shape {self.latent_shape}); valid choices: {valid}"
            )
        self.tokens = tokens
        self.dim = self.numel // tokens
        self.kind = kind
        self.channels = self.latent_shape[0]
        self.positions = self.numel // self.channels
        self.per_position = 1
        if kind == "position":
            if tokens % self.positions or self.channels % (tokens // self.positions):
                valid = [p * self.positions for p in range(1, self.channels + 1) if self.channels % p == 0]
                raise ValueError(
                    f"model.quantizer.tokens={tokens} with model.layout=position: tokens must be the number "
                    f"of positions ({self.positions} for a latent of shape {self.latent_shape}) times a "
                    f"divisor of the {self.channels} channels; valid choices: {valid} (or model.layout="
                    "contiguous)"
                )
            self.per_position = tokens // self.positions
        elif kind != "contiguous":
            raise ValueError(f"model.layout={kind!r}: expected contiguous or position")

    def to_tokens(self, z: torch.Tensor, channel_order: torch.Tensor | None = None) -> torch.Tensor:
        """(B, *latent_shape) -> (B, T, d). ``channel_order`` (C,) int64: the position layout's channel
        order (None: 0..C-1); ignored by the contiguous layout."""
        if tuple(z.shape[1:]) != self.latent_shape:
            raise ValueError(f"latent shape {tuple(z.shape[1:])} != layout's {self.latent_shape}")
        b = z.shape[0]
        if self.kind == "contiguous":
            return z.reshape(b, self.tokens, self.dim)
        if channel_order is not None:
            z = z.index_select(1, channel_order)
        # channel j of the order = k * P + g (k < d) goes to group g: (B, d, P, S) -> (B, S, P, d)
        z_bdps = z.reshape(b, self.dim, self.per_position, self.positions)
        return z_bdps.permute(0, 3, 2, 1).reshape(b, self.tokens, self.dim)

    def to_latent(self, tokens_btd: torch.Tensor, channel_order: torch.Tensor | None = None) -> torch.Tensor:
        """(B, T, d) -> (B, *latent_shape); the exact inverse of :meth:`to_tokens` with the same order."""
        if tuple(tokens_btd.shape[1:]) != (self.tokens, self.dim):
            raise ValueError(f"tokens shape {tuple(tokens_btd.shape[1:])} != ({self.tokens}, {self.dim})")
        b = tokens_btd.shape[0]
        if self.kind == "contiguous":
            return tokens_btd.reshape(b, *self.latent_shape)
        t_bspd = tokens_btd.reshape(b, self.positions, self.per_position, self.dim)
        z = t_bspd.permute(0, 3, 2, 1).reshape(b, self.channels, self.positions)
        if channel_order is not None:
            z = z.index_select(1, torch.argsort(channel_order))
        return z.reshape(b, *self.latent_shape)

    def __repr__(self) -> str:
        return (
            f"TokenLayout(latent_shape={self.latent_shape}, tokens={self.tokens}, dim={self.dim}, "
            f"kind={self.kind!r})"
        )
