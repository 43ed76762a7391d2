"""The one contract every quantizer follows.

``forward(tokens_btd) -> QuantOut(quantized_btd, ids_bt, losses)`` and ``codes(ids_bt) -> quantized_btd``,
the exact inverse of the forward's quantized output in eval mode. Distributed behaviour (code-usage counts
for resets, GQ's adaptive weights) goes through an injected ``reduce_fn`` that sums a tensor across ranks
in place; it defaults to a no-op so the core is tested single-process.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import nn

ReduceFn = Callable[[torch.Tensor], torch.Tensor]
"""Sums a tensor over all ranks (in place, and returns it). Single process: identity."""


def no_reduce(t: torch.Tensor) -> torch.Tensor:
    return t


@dataclass
class QuantOut:
    """What every quantizer's forward returns."""

    quantized_btd: torch.Tensor
    """Quantized tokens (B, T, d); straight-through where the method trains through them."""
    ids_bt: torch.Tensor
    """Code index per token (B, T), int64, in [0, K) of that token's group."""
    losses: dict[str, torch.Tensor] = field(default_factory=dict)
    """Named scalar losses to add to the objective (already weighted)."""


@dataclass
class ResetReport:
    """Which codebook rows a reset overwrote, so the trainer can clear their optimizer moments."""

    groups: torch.Tensor  # (n,) int64 group index of each reset row
    codes: torch.Tensor  # (n,) int64 code index within the group
    param_name: str = "codebook"  # the parameter (within the quantizer) whose rows these are

    @property
    def count(self) -> int:
        return int(self.groups.numel())


class Quantizer(nn.Module):
    """Base class. Subclasses set ``tokens``, ``dim``, ``codebook_size`` and implement forward/codes."""

    tokens: int
    dim: int
    codebook_size: int

    def __init__(self, reduce_fn: ReduceFn = no_reduce):
        super().__init__()
        self.reduce_fn = reduce_fn

    def forward(self, tokens_btd: torch.Tensor) -> QuantOut:  # pragma: no cover - abstract
        raise NotImplementedError

    def codes(self, ids_bt: torch.Tensor) -> torch.Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    @torch.no_grad()
    def init_from_tokens(self, tokens_ntd: torch.Tensor, generator: torch.Generator | None = None) -> None:
        """Initialize codebooks from sampled training tokens (N, T, d). No-op for methods without one."""

    @torch.no_grad()
    def maybe_reset(self, generator: torch.Generator | None = None) -> ResetReport | None:
        """Apply a reset of dead codes if the method has one; counts are reduced with ``reduce_fn`` first."""
        return None

    def usage_stats(self) -> dict[str, torch.Tensor]:
        """Per-group usage fraction, perplexity and dead-code count from the hit counts since last reset."""
        return {}
