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
    usage: dict[str, torch.Tensor] | None = None
    """:func:`usage_from_counts` of the global counts the reset used (before zeroing them), so a report at a
    reset step needs no second all-reduce of the (G, K) counts."""

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

    def _set_sizes(self, tokens: int, dim: int, codebook_size: int) -> None:
        """Check and set T (tokens), d (dim) and K (codebook_size): every subclass calls this once."""
        if min(tokens, dim) < 1 or codebook_size < 2:
            raise ValueError(
                f"need tokens >= 1, dim >= 1, codebook_size >= 2; got {tokens}, {dim}, {codebook_size}"
            )
        self.tokens, self.dim, self.codebook_size = tokens, dim, codebook_size

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


# ------------------------------------------------------------------------------------------ shared helpers
@torch.no_grad()
def accumulate_counts(counts_gk: torch.Tensor, ids_bt: torch.Tensor) -> torch.Tensor:
    """Add one hit per token to ``counts_gk[t, ids_bt[b, t]]`` in place (ids are per group, in [0, K)).

    ``index_add_`` on the flat view: a ``bincount`` would allocate a fresh (G*K,) tensor every step, which is
    512 MB at G=256, K=262,144.
    """
    G, K = counts_gk.shape
    if ids_bt.dim() != 2 or ids_bt.shape[1] != G:
        raise ValueError(f"ids shape {tuple(ids_bt.shape)} != (B, {G})")
    offsets = torch.arange(G, device=ids_bt.device, dtype=torch.long) * K
    flat = (ids_bt.long() + offsets).reshape(-1)
    ones = torch.ones(1, dtype=counts_gk.dtype, device=counts_gk.device).expand(flat.numel())
    counts_gk.view(-1).index_add_(0, flat, ones)
    return counts_gk


@torch.no_grad()
def usage_from_counts(counts_gk: torch.Tensor, dead_threshold: int = 1) -> dict[str, torch.Tensor]:
    """Per-group code-usage statistics from hit counts (G, K); every value has shape (G,).

    ``usage``: fraction of codes with at least one hit; ``perplexity``: exp of the entropy of the hit
    distribution (K when every code is hit equally, 1 when one code takes everything, 0 for no hits);
    ``dead``: number of codes with fewer than ``dead_threshold`` hits; ``hits``: total hits.
    """
    # float32 on the counts' device: exact for counts below 2^24, and half the transient of float64 (the
    # (G, K) counts are 67 M values at 256T-L). The sum is taken in float64 so large totals stay exact.
    c = counts_gk.detach().to(torch.float32)
    total = counts_gk.detach().sum(-1, dtype=torch.float64).to(torch.float32)
    p = c / total.clamp_min(1)[:, None]
    entropy = -(p * torch.where(p > 0, p.log(), torch.zeros_like(p))).sum(-1)
    perplexity = torch.where(total > 0, entropy.exp(), torch.zeros_like(entropy))
    return {
        "usage": (c >= 1).to(torch.float32).mean(-1),
        "perplexity": perplexity,
        "dead": (c < dead_threshold).sum(-1),
        "hits": total,
    }


class _StraightThrough(torch.autograd.Function):
    @staticmethod
    def forward(ctx, z: torch.Tensor, q: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        return q.detach().clone()

    @staticmethod
    def backward(ctx, grad: torch.Tensor):  # type: ignore[override]
        return grad, None


def straight_through(z: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """Value of ``q`` exactly, gradient passed to ``z`` unchanged.

    Same gradient as the usual ``z + (q - z).detach()``, but that expression can differ from ``q`` in the last
    bit; here the forward value is ``q`` itself, so ``codes(ids)`` reproduces it exactly.
    """
    if not z.requires_grad:
        return q.detach()
    return _StraightThrough.apply(z, q)
