"""Mergeable per-element running statistics (Chan et al.'s parallel variance update).

Many workers (Ray Data blocks, training ranks) each fit a :class:`RunningStats` on their part of the data;
``a.merge(b)`` combines them exactly, in float64, with no second pass and no full load.
"""

from __future__ import annotations

from typing import Any

import torch


class RunningStats:
    """Count, mean and sum of squared deviations (M2) per element of a fixed shape, in float64."""

    def __init__(self, shape: tuple[int, ...] | list[int]):
        self.shape = tuple(int(s) for s in shape)
        self.count = 0
        self.mean = torch.zeros(self.shape, dtype=torch.float64)
        self.m2 = torch.zeros(self.shape, dtype=torch.float64)

    def update(self, batch: torch.Tensor) -> RunningStats:
        """Add a batch of shape (B, *shape)."""
        if tuple(batch.shape[1:]) != self.shape:
            raise ValueError(f"batch element shape {tuple(batch.shape[1:])} != stats shape {self.shape}")
        x = batch.detach().to(dtype=torch.float64, device="cpu")
        n = x.shape[0]
        if n == 0:
            return self
        other = RunningStats(self.shape)
        other.count = n
        other.mean = x.mean(0)
        other.m2 = ((x - other.mean) ** 2).sum(0)
        return self.merge(other)

    def merge(self, other: RunningStats) -> RunningStats:
        """In-place merge of another partial result; returns self."""
        if other.shape != self.shape:
            raise ValueError(f"cannot merge stats of shape {other.shape} into {self.shape}")
        if other.count == 0:
            return self
        if self.count == 0:
            self.count, self.mean, self.m2 = other.count, other.mean.clone(), other.m2.clone()
            return self
        n = self.count + other.count
        delta = other.mean - self.mean
        self.mean = self.mean + delta * (other.count / n)
        self.m2 = self.m2 + other.m2 + delta**2 * (self.count * other.count / n)
        self.count = n
        return self

    @property
    def var(self) -> torch.Tensor:
        """Population variance (what standardization uses)."""
        return self.m2 / max(self.count, 1)

    @property
    def std(self) -> torch.Tensor:
        return self.var.sqrt()

    def state_dict(self) -> dict[str, Any]:
        return {
            "shape": list(self.shape),
            "count": self.count,
            "mean": self.mean.tolist(),
            "m2": self.m2.tolist(),
        }

    @classmethod
    def from_state_dict(cls, state: dict[str, Any]) -> RunningStats:
        out = cls(state["shape"])
        out.count = int(state["count"])
        out.mean = torch.tensor(state["mean"], dtype=torch.float64).reshape(out.shape)
        out.m2 = torch.tensor(state["m2"], dtype=torch.float64).reshape(out.shape)
        return out
