"""Token layout: standardized latents <-> tokens, C-major contiguous as in ReVQ.

A latent of shape (C, H, W) (images) or (C, L) (audio) is flattened in C-major order and cut into T
contiguous tokens of d = C*H*W / T values. With C=32, H=W=8 and T=512 a token is a 1x4 half-row of one
channel. Splitting along channels is what ReVQ calls channel multi-group quantization.
"""

from __future__ import annotations

import math

import torch


def valid_token_counts(latent_numel: int) -> list[int]:
    """All T that divide the latent size (the valid values of ``model.quantizer.tokens``)."""
    return [t for t in range(1, latent_numel + 1) if latent_numel % t == 0]


class TokenLayout:
    """Maps ``z_b*`` (any latent shape) to ``tokens_btd`` and back; a pure reshape, so exactly invertible."""

    def __init__(self, latent_shape: tuple[int, ...] | list[int], tokens: int):
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

    def to_tokens(self, z: torch.Tensor) -> torch.Tensor:
        """(B, *latent_shape) -> (B, T, d)."""
        if tuple(z.shape[1:]) != self.latent_shape:
            raise ValueError(f"latent shape {tuple(z.shape[1:])} != layout's {self.latent_shape}")
        return z.reshape(z.shape[0], self.tokens, self.dim)

    def to_latent(self, tokens_btd: torch.Tensor) -> torch.Tensor:
        """(B, T, d) -> (B, *latent_shape)."""
        if tuple(tokens_btd.shape[1:]) != (self.tokens, self.dim):
            raise ValueError(f"tokens shape {tuple(tokens_btd.shape[1:])} != ({self.tokens}, {self.dim})")
        return tokens_btd.reshape(tokens_btd.shape[0], *self.latent_shape)

    def __repr__(self) -> str:
        return f"TokenLayout(latent_shape={self.latent_shape}, tokens={self.tokens}, dim={self.dim})"
