"""Quantizers: ReVQ's grouped VQ (and plain VQ), SimVQ, GQ. Build one from config: :func:`build_quantizer`."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from revq_ray.core.quantizers.base import (
    Quantizer,
    QuantOut,
    ReduceFn,
    ResetReport,
    accumulate_counts,
    no_reduce,
    straight_through,
    usage_from_counts,
)
from revq_ray.core.quantizers.gq import GaussianQuant, gaussian_prior_samples
from revq_ray.core.quantizers.grouped import GroupedVQ, ResetParams, kmeans_plus_plus, lloyd
from revq_ray.core.quantizers.search import SearchPlan, estimate_peak_bytes, nearest_code, plan_search
from revq_ray.core.quantizers.simvq import SimVQ
from revq_ray.specs import RESET

if TYPE_CHECKING:  # pragma: no cover - the bridge reads a config object; the core never imports pydantic
    from revq_ray.config import QuantizerConfig

__all__ = [
    "QuantOut",
    "Quantizer",
    "ReduceFn",
    "ResetReport",
    "no_reduce",
    "build_quantizer",
    "GroupedVQ",
    "ResetParams",
    "SimVQ",
    "GaussianQuant",
    "nearest_code",
    "plan_search",
    "estimate_peak_bytes",
    "SearchPlan",
    "accumulate_counts",
    "usage_from_counts",
    "straight_through",
    "gaussian_prior_samples",
    "kmeans_plus_plus",
    "lloyd",
]


def build_quantizer(cfg: QuantizerConfig, dim: int, reduce_fn: ReduceFn = no_reduce) -> Quantizer:
    """Build the quantizer named by ``cfg.type`` for ``cfg.tokens`` groups of ``dim``-dimensional tokens.

    The bridge from config to the plain-argument classes: ``cfg`` is a
    :class:`~revq_ray.config.QuantizerConfig` (or any object with its fields); nothing here imports it.
    ``"revq"`` and ``"vq"`` -> :class:`GroupedVQ` (``vq`` is the no-reset ablation: its config forces
    ``reset.enabled = False``); ``"simvq"`` -> :class:`SimVQ`; ``"gq"`` -> :class:`GaussianQuant`.
    """
    if dim < 1:
        raise ValueError(f"token dim must be >= 1, got {dim} (latent size / model.quantizer.tokens)")
    common = dict(search_budget_mb=cfg.search_budget_mb, reduce_fn=reduce_fn)
    if cfg.type in ("revq", "vq"):
        return GroupedVQ(
            cfg.tokens, dim, cfg.codebook_size, loss=cfg.loss, beta=cfg.beta, init=cfg.init,
            kmeans_iters=cfg.kmeans_iters, reset_cfg=_reset_params(cfg.reset), **common,
        )  # fmt: skip
    if cfg.type == "simvq":
        return SimVQ(
            cfg.tokens, dim, cfg.codebook_size, beta=cfg.beta, shared=cfg.simvq_shared, seed=cfg.simvq_seed,
            **common,
        )  # fmt: skip
    if cfg.type == "gq":
        return GaussianQuant(cfg.tokens, dim, cfg.codebook_size, beta=cfg.gq_beta, seed=cfg.gq_seed, **common)
    raise ValueError(f"model.quantizer.type={cfg.type!r}: expected one of revq, vq, simvq, gq")


def _reset_params(reset: Any) -> ResetParams:
    """``ResetConfig`` (or anything with its fields) -> the quantizer's :class:`ResetParams`."""
    return ResetParams(**{name: spec.type(getattr(reset, name)) for name, spec in RESET.items()})
