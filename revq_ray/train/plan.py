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

from revq_ray.config import SYNTHETIC, ConfigError, RunConfig
from revq_ray.core.layout import TokenLayout
from revq_ray.data.fs import cache_dir
from revq_ray.runtime import absolute, get_logger, is_uri, join_location
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
    channel_weights: list[float] | None = None
    """``model.weighting: decoder``: the decoder's per-channel sensitivity (mean 1), measured here once; None
    for unweighted models and for runs restored from a checkpoint (it holds them)."""
    run_uri: str | None = None
    """With a URI as storage: ``<storage>/<name>``, where rank 0 mirrors ``run_dir`` (logs, exports, run
    files) beside Ray Train's checkpoints; None for a local storage folder (``run_dir`` is then inside it)."""


def synthetic_location(cfg: RunConfig) -> str:
    """Where ``data.shards: synthetic`` writes its latents: ``<output_dir>/synthetic/<n>x<shape>-seed<s>``.

    The name carries every setting the latents depend on, so runs that ask for the same synthetic data share
    one copy and runs that ask for other data never read it."""
    tc = cfg.train
    spec = f"{tc.synthetic_items}x{'x'.join(str(s) for s in tc.synthetic_latent_shape)}-seed{cfg.seed}"
    return join_location(absolute(cfg.output_dir), "synthetic", spec)


def resolve_paths(cfg: RunConfig) -> RunConfig:
    """A copy of ``cfg`` with local paths made absolute and ``data.shards: synthetic`` replaced by the folder
    it names (:func:`synthetic_location`)."""
    shards = synthetic_location(cfg) if cfg.data.shards == SYNTHETIC else absolute(cfg.data.shards)
    data = cfg.data.model_copy(update={"shards": shards, "val_shards": absolute(cfg.data.val_shards)})
    return cfg.model_copy(update={"data": data, "output_dir": absolute(cfg.output_dir)})


def check_storage(cfg: RunConfig) -> None:
    """Seconds, before Ray starts: every URI the run uses answers (``data.shards`` and ``data.val_shards``
    readable, ``output_dir`` writable), else a :class:`~revq_ray.data.fs.StorageError` naming it."""
    from revq_ray.data.fs import check_location

    for loc in (cfg.data.shards, cfg.data.val_shards):
        if loc and is_uri(loc):
            check_location(loc)
    if is_uri(cfg.output_dir):
        check_location(cfg.output_dir, write=True)


def ensure_shards(cfg: RunConfig) -> None:
    """Check that ``data.shards`` holds a finished latent-shard directory, before Ray starts anything.

    Synthetic latents are written only when the config asks for them by name (``data.shards: synthetic``,
    as the debug preset does, resolved by :func:`resolve_paths`): a mistyped path is an error naming it, never
    a "successful" run on random numbers."""
    from revq_ray.data import fs as _fs

    shards = cfg.data.shards
    if not shards:
        raise ConfigError(
            "data.shards is empty: point it at a directory written by `python -m revq_ray.encode`, or set "
            "data.shards: synthetic for a run on synthetic latents"
        )
    fs, root = _fs.resolve(shards)
    if _fs.is_file(fs, _fs.join(root, "manifest.json")):
        return
    if shards != synthetic_location(cfg):
        raise FileNotFoundError(
            f"data.shards={shards}: no manifest.json there, so it is not a latent-shard directory (a typo, "
            "or an encode that has not finished). Write one with `python -m revq_ray.encode --input MEDIA "
            f"--vae SPEC --output {shards}`, or set data.shards: synthetic for a run on synthetic latents"
        )
    from revq_ray.data.synthetic import write_synthetic_shards

    n, shape = cfg.train.synthetic_items, cfg.train.synthetic_latent_shape
    _log(
        f"data.shards: synthetic -> writing {n} synthetic latents of shape {shape} to {shards} (random "
        "numbers for smoke tests; point data.shards at real latents from `python -m revq_ray.encode`)"
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
    try:  # names model.quantizer.tokens / model.layout and the valid choices
        TokenLayout(manifest.latent_shape, cfg.model.quantizer.tokens, kind=cfg.model.layout)
    except ValueError as err:
        raise ConfigError(str(err)) from None
    if (
        cfg.model.weighting == "decoder"
        and not weighting_vae_specs(cfg, manifest)
        and not cfg.model.init_from
    ):
        raise ConfigError(
            "model.weighting=decoder measures the decoder's sensitivity, but neither `vae` nor the shards' "
            f"manifest ({cfg.data.shards}: vae={manifest.vae!r}) names a VAE: set vae: <spec> (the one the "
            "latents came from)"
        )
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


def weighting_vae_specs(cfg: RunConfig, manifest: Any) -> list[str]:
    """The VAE specs ``model.weighting: decoder`` may load, in order: ``vae``, then the manifest's (when it
    names one: synthetic shards do not)."""
    from revq_ray.vae import parse_spec

    out = []
    for spec in dict.fromkeys(s for s in (cfg.vae, manifest.vae) if s):
        try:
            parse_spec(spec)
        except ValueError:
            continue
        out.append(spec)
    return out


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
    """Whether the workers will resume this run: it has a complete, intact checkpoint in storage."""
    from revq_ray.train.checkpoint import has_usable

    return has_usable(storage, name)


def init_sample_size(cfg: RunConfig) -> int:
    """Latents drawn for codebook init: ``data.init_samples``, else K (one token per code and group)."""
    return cfg.data.init_samples or cfg.model.quantizer.codebook_size


def measure_channel_weights(cfg: RunConfig, manifest: Any) -> list[float]:
    """``model.weighting: decoder``: the frozen decoder's per-channel sensitivity in standardized units
    (:func:`revq_ray.core.sensitivity.decoder_channel_weights`) over ``model.weighting_samples`` training
    latents (a bounded read), on the driver's CPU; the VAE is ``vae`` (else the manifest's)."""
    import torch

    from revq_ray.core.sensitivity import decoder_channel_weights
    from revq_ray.core.stats import RunningStats
    from revq_ray.data.reader import sample_init_tokens_bounded
    from revq_ray.vae import load_vae_for

    t0 = time.time()
    errors = []
    for spec in weighting_vae_specs(cfg, manifest):
        try:
            vae = load_vae_for(spec, manifest.latent_shape, "cpu")
            break
        except Exception as err:  # noqa: BLE001 - any load failure: try the next spec, then report them all
            errors.append(f"{spec}: {type(err).__name__}: {err}")
    else:
        raise ConfigError(
            "model.weighting=decoder needs the VAE the latents came from, and none loaded: "
            + "; ".join(errors)
            + ". Fix `vae` (a path relative to where you run, or absolute), or set model.weighting: none"
        )
    val_items = 0 if cfg.data.val_shards else cfg.data.val_items
    n = cfg.model.weighting_samples
    whole, _ = sample_init_tokens_bounded(manifest, 1, n, seed=cfg.seed + 1, val_items=val_items)
    z = whole.reshape(len(whole), *manifest.latent_shape)
    stats = RunningStats.from_state_dict(manifest.stats)
    std = stats.std.float().clamp_min(1e-6)
    w = decoder_channel_weights(vae.decode_differentiable, z, stats.mean.float(), std, seed=cfg.seed)
    top = torch.sort(w, descending=True).values
    _log(
        f"decoder channel weights ({vae.spec}, {len(z)} latents, {time.time() - t0:.1f}s): "
        f"max {float(top[0]):.3g}, min {float(top[-1]):.3g}, top-4 share {float(top[:4].sum() / w.sum()):.0%}"
    )
    return [float(x) for x in w]


def draw_init_tokens(
    cfg: RunConfig, manifest: Any, channel_weights: list[float] | None = None
) -> tuple[Any, dict[str, int]]:
    """The codebook-init tokens (a bounded read of a few shards) in the model's token layout, put in Ray's
    object store."""
    import ray

    from revq_ray.data.reader import sample_init_tokens_bounded

    t0 = time.time()
    val_items = 0 if cfg.data.val_shards else cfg.data.val_items
    to_tokens = None
    if cfg.model.layout != "contiguous":
        # the same layout and channel order as the model (ReVQModel.set_channel_weights), so each group's
        # init rows are whole tokens of one latent
        import numpy as np
        import torch

        from revq_ray.core.layout import channel_order_for
        from revq_ray.core.standardizer import Standardizer

        layout = TokenLayout(manifest.latent_shape, cfg.model.quantizer.tokens, kind=cfg.model.layout)
        order = None
        if channel_weights is not None:
            w = Standardizer.normalize_weights(torch.tensor(channel_weights), layout.channels)
            order = channel_order_for(w.float())

        def to_tokens(z_n: np.ndarray) -> np.ndarray:
            return layout.to_tokens(torch.from_numpy(z_n), order).numpy()

    tokens_ntd, info = sample_init_tokens_bounded(
        manifest,
        cfg.model.quantizer.tokens,
        init_sample_size(cfg),
        seed=cfg.seed,
        val_items=val_items,
        to_tokens=to_tokens,
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
    # With a URI as storage, rank 0 writes logs and exports into a local folder standing for the run and
    # mirrors it to <storage>/<name> (see revq_ray.train.loop.sync_run_dir).
    run_uri = join_location(storage, name) if is_uri(storage) else None
    run_dir = str(cache_dir(run_uri, "runs")) if run_uri else str(Path(storage) / name)
    init_ref, init_info, weights = (None, None, None)
    if not cfg.model.init_from and not _has_checkpoint(storage, name):  # init_from brings its own codebook
        if cfg.model.weighting == "decoder":
            weights = measure_channel_weights(cfg, manifest)
        init_ref, init_info = draw_init_tokens(cfg, manifest, weights)
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
        channel_weights=weights,
        run_uri=run_uri,
    )
    datasets = {"train": train_ds} if val_ds is None else {"train": train_ds, "val": val_ds}
    return plan, datasets
