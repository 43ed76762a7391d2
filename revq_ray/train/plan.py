"""The run plan: what the driver works out once, before any worker starts, and hands to every worker.

``plan_run(cfg)`` reads the manifest(s), checks the config against the data, computes the schedule's
sizes, and draws the codebook-init sample from a bounded number of shards (seconds, however large the
dataset; every rank gets the same sample through Ray's object store, so no rank streams the training set
while the others wait in ``deepspeed.initialize``). The result is a typed :class:`RunPlan`; the Ray
datasets travel separately (Ray Train wants them as ``datasets=``).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from revq_ray.config import ConfigError, RunConfig
from revq_ray.core.layout import TokenLayout
from revq_ray.runtime import absolute, get_logger, is_uri
from revq_ray.train import engine as eng

_log = get_logger("revq_ray.train").info


@dataclass
class RunPlan:
    """Facts about a run that every worker needs, fixed before training starts."""

    latent_shape: list[int]
    has_logvar: bool
    stats: dict[str, Any]
    """Per-element latent statistics (``RunningStats.state_dict``) for the standardizer."""
    vae: str
    train_count: int
    val_count: int
    has_val: bool
    micro_batch: int
    """Latents per worker per step (the global batch / workers)."""
    steps_per_epoch: int
    total_steps: int
    storage_path: str
    name: str
    run_dir: str
    init_tokens: Any = None
    """Ray ObjectRef of the (n, T, d) float32 raw codebook-init tokens; None when resuming a run that has a
    checkpoint (the codebook comes from it)."""
    init_info: dict[str, int] | None = None


def resolve_paths(cfg: RunConfig) -> RunConfig:
    """A copy of ``cfg`` with local paths made absolute."""
    data = cfg.data.model_copy(
        update={"shards": absolute(cfg.data.shards), "val_shards": absolute(cfg.data.val_shards)}
    )
    return cfg.model_copy(update={"data": data, "output_dir": absolute(cfg.output_dir)})


def ensure_shards(cfg: RunConfig) -> None:
    """Write synthetic shards where ``data.shards`` points if it holds none and ``train.synthetic_items`` > 0
    (the debug preset does this, so it runs anywhere with no data)."""
    shards = cfg.data.shards
    if not shards or is_uri(shards) or (Path(shards) / "manifest.json").is_file():
        return
    n = cfg.train.synthetic_items
    if n <= 0:
        return
    from revq_ray.data.synthetic import write_synthetic_shards

    shape = cfg.train.synthetic_latent_shape
    _log(
        f"data.shards={shards} holds no manifest.json: writing {n} synthetic latents of shape {shape} there "
        "(train.synthetic_items > 0; point data.shards at real latents from `python -m revq_ray.encode` "
        "instead)"
    )
    write_synthetic_shards(shards, n, shape, with_logvar=True, seed=cfg.seed)


def _check_config(cfg: RunConfig, manifest: Any) -> None:
    tc = cfg.train
    try:
        eng.check_fast_paths(tc)
    except ValueError as err:
        raise ConfigError(str(err)) from None
    if tc.zero_stage > 2:
        eng.deepspeed_config(tc, tc.num_workers)  # raises the explanatory error
    TokenLayout(manifest.latent_shape, cfg.model.quantizer.tokens)  # raises naming model.quantizer.tokens
    if cfg.model.quantizer.type == "gq" and not manifest.has_logvar:
        raise ConfigError(
            f"model.quantizer.type=gq needs the VAE posterior's log-variance, but data.shards="
            f"{cfg.data.shards} holds latents only (manifest has_logvar=false). Encode with a Gaussian VAE "
            "that exposes its posterior (python -m revq_ray.encode ... --logvar), or choose "
            "model.quantizer.type revq, vq or simvq"
        )
    if manifest.stats is None:
        raise ConfigError(
            f"data.shards={cfg.data.shards}: the manifest has no latent statistics to standardize with"
        )
    if cfg.model.init_from:  # fine-tuning a saved model: its shapes must match, before any worker starts
        from revq_ray.published import check_init_from

        check_init_from(cfg.model, manifest.latent_shape)


def _val_dataset(cfg: RunConfig, val_ds: Any) -> tuple[Any, int]:
    if val_ds is None:
        return None, 0
    # The hash hold-out reads every shard to find its rows: do it once here, not every validation.
    val_ds = val_ds.materialize()
    val_count = val_ds.count()
    if val_count < cfg.train.num_workers:
        _log(
            f"only {val_count} validation latents for {cfg.train.num_workers} workers: reporting the "
            "training loss as val_mse"
        )
        return None, 0
    return val_ds, val_count


def _has_checkpoint(storage: str, name: str) -> bool:
    """Whether Ray Train will restore this run (a local run directory holding a checkpoint)."""
    if is_uri(storage):
        return False  # cannot tell cheaply: sample anyway (a few seconds)
    return any(Path(storage, name).glob("checkpoint_*"))


def init_sample_size(cfg: RunConfig) -> int:
    """Latents drawn for codebook init: ``data.init_samples``, else K (one token per code and group)."""
    return cfg.data.init_samples or cfg.model.quantizer.codebook_size


def draw_init_tokens(cfg: RunConfig, manifest: Any) -> tuple[Any, dict[str, int]]:
    """The codebook-init tokens (a bounded read of a few shards), put in Ray's object store."""
    import ray

    from revq_ray.data.reader import sample_init_tokens_bounded

    t0 = time.time()
    val_items = 0 if cfg.data.val_shards else cfg.data.val_items
    tokens_ntd, info = sample_init_tokens_bounded(
        manifest, cfg.model.quantizer.tokens, init_sample_size(cfg), seed=cfg.seed, val_items=val_items
    )
    info["seconds"] = round(time.time() - t0, 2)
    return ray.put(tokens_ntd), info


def plan_run(
    cfg: RunConfig, *, storage_path: str | None = None, run_name: str | None = None
) -> tuple[RunPlan, dict[str, Any]]:
    """Read the manifest(s), check ``cfg`` against the data and compute the run's fixed facts.

    Returns ``(plan, datasets)``; ``datasets`` maps ``"train"`` (and ``"val"``) to Ray datasets."""
    from revq_ray.data.reader import train_val_datasets
    from revq_ray.data.shards import read_manifest

    tc = cfg.train
    micro = eng.per_worker_batch(tc)
    manifest = read_manifest(cfg.data.shards)
    _check_config(cfg, manifest)
    t0 = time.time()
    train_ds, val_ds = train_val_datasets(cfg.data, cfg.seed)
    val_ds, val_count = _val_dataset(cfg, val_ds)
    train_count = manifest.count if cfg.data.val_shards else manifest.count - val_count
    per_worker_rows = train_count // tc.num_workers  # Ray Train splits evenly (equal=True)
    spe = tc.steps_per_epoch or per_worker_rows // micro
    if spe < 1:
        raise ConfigError(
            f"{train_count} training latents over {tc.num_workers} workers do not fill one batch of "
            f"{micro} per worker: lower train.batch_size (global {tc.batch_size}) or add data"
        )
    total = min(tc.epochs * spe, tc.max_steps) if tc.max_steps else tc.epochs * spe
    storage = absolute(storage_path or cfg.output_dir)
    name = run_name or cfg.name
    # With a URI as storage, logs and exports are written on the rank-0 node (they are small).
    run_dir = (
        str(Path.home() / ".cache" / "revq_ray" / "runs" / name)
        if is_uri(storage)
        else str(Path(storage) / name)
    )
    init_ref, init_info = (None, None)
    if not cfg.model.init_from and not _has_checkpoint(storage, name):  # init_from brings its own codebook
        init_ref, init_info = draw_init_tokens(cfg, manifest)
    _log(
        f"data {cfg.data.shards}: {train_count} train / {val_count} val latents of shape "
        f"{manifest.latent_shape} ({time.time() - t0:.1f}s to plan)"
    )
    plan = RunPlan(
        latent_shape=list(manifest.latent_shape),
        has_logvar=bool(manifest.has_logvar),
        stats=manifest.stats,
        vae=manifest.vae,
        train_count=train_count,
        val_count=val_count,
        has_val=val_ds is not None,
        micro_batch=micro,
        steps_per_epoch=spe,
        total_steps=total,
        storage_path=storage,
        name=name,
        run_dir=run_dir,
        init_tokens=init_ref,
        init_info=init_info,
    )
    datasets = {"train": train_ds} if val_ds is None else {"train": train_ds, "val": val_ds}
    return plan, datasets
