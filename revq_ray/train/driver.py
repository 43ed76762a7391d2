"""The training driver: config -> Ray -> ``TorchTrainer`` -> ``Result``.

One builder, :func:`build_trainer`, serves both ``python -m revq_ray.train`` (through :func:`run`) and the
Tune driver (one Train run per trial, with ``callbacks=[TuneReportCallback()]``).

Where things go (``R = <output_dir>/<name>``, the Ray Train storage folder of the run)::

    R/checkpoint_step000001234/   Ray Train checkpoints (DeepSpeed state of every rank + trainer_state.json)
    R/metrics.csv, R/tensorboard/ metrics of rank 0 (committed timeline: resumed steps are not listed twice)
    R/export/latest, R/export/best  save_pretrained exports (ReVQModel.from_pretrained loads them)
    R/config.json, R/workers.json, R/starts.csv

Re-running with the same ``name`` and ``output_dir`` resumes from the last checkpoint (Ray Train V2 restores
the run's checkpoint history from ``R``). ``output_dir`` may be a URI (s3://, gs://): checkpoints then live
there, while the CSV/TensorBoard logs and exports are written on the rank-0 node under
``~/.cache/revq_ray/runs/<name>`` (they are small; copy them if you need them elsewhere).
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from revq_ray.config import ConfigError, RunConfig, dump_config, load_config
from revq_ray.core.layout import TokenLayout
from revq_ray.train import engine as eng

if TYPE_CHECKING:  # pragma: no cover
    import ray.train
    from ray.train.torch import TorchTrainer

DEFAULT_EXTENSIONS_DIR = Path.home() / ".cache" / "revq_ray" / "torch_extensions"


def _log(msg: str) -> None:
    print(f"[revq_ray.train] {msg}", flush=True)


def _is_uri(path: str) -> bool:
    return "://" in path


def _abs(path: str) -> str:
    """Local paths become absolute (workers do not share the driver's working directory); URIs stay."""
    return path if not path or _is_uri(path) else str(Path(path).expanduser().resolve())


# --------------------------------------------------------------------------------------------- ray
def init_ray(address: str | None = None, num_cpus: int | None = None) -> None:
    """Connect to a cluster or start a local Ray.

    Joins ``address`` if given, else ``$RAY_ADDRESS`` (set by ``ray job submit`` for the job's driver, or by
    the user). Otherwise starts a private local instance with ``num_cpus`` logical CPUs (default: at least 8,
    above the core count, so Ray Data's readers are not starved by the training workers' reservations). It
    never attaches to some other Ray that happens to run on the machine unless told to (``--address auto``).
    """
    import ray

    if ray.is_initialized():
        return
    address = address or os.environ.get("RAY_ADDRESS") or None
    if address:
        ray.init(address=address, log_to_driver=True)
        _log(f"joined Ray cluster at {address}: {ray.cluster_resources()}")
    else:
        n = num_cpus or max(8, os.cpu_count() or 1)
        # A busy laptop can take more than Ray's default minute to register the raylet.
        os.environ.setdefault("RAY_raylet_start_wait_time_s", "180")
        # The dashboard (on 127.0.0.1; another free port when 8265 is taken) serves the state API that Ray
        # Train's placement-group cleaner polls: without it the driver log fills with its warnings.
        ray.init(address="local", num_cpus=n)  # "local": never the last `ray start` cluster here
        _log(f"started a local Ray with {n} logical CPUs")


def quiet_data_progress() -> None:
    """Ray Data's per-operator progress bars flood job logs; the training loop prints its own progress."""
    from ray.data import DataContext

    ctx = DataContext.get_current()
    ctx.enable_progress_bars = False
    ctx.print_on_execution_start = False


# --------------------------------------------------------------------------------------------- planning
def _ensure_shards(cfg: RunConfig) -> None:
    """Write synthetic shards where ``data.shards`` points if it holds none and ``train.synthetic_items`` > 0
    (the debug preset does this, so it runs anywhere with no data)."""
    shards = cfg.data.shards
    if not shards or _is_uri(shards) or (Path(shards) / "manifest.json").is_file():
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


def plan_run(
    cfg: RunConfig, *, storage_path: str | None = None, run_name: str | None = None
) -> dict[str, Any]:
    """Read the manifest(s), check the config against the data, and compute the run's fixed facts.

    Returns the ``plan`` the workers get, plus the datasets under ``"_datasets"``."""
    from revq_ray.data.reader import train_val_datasets
    from revq_ray.data.shards import read_manifest

    tc = cfg.train
    micro = eng.per_worker_batch(tc)
    try:
        eng.check_fast_paths(tc)
    except ValueError as err:
        raise ConfigError(str(err)) from None
    if tc.zero_stage > 2:
        eng.deepspeed_config(tc, tc.num_workers)  # raises the explanatory error
    manifest = read_manifest(cfg.data.shards)
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

    t0 = time.time()
    train_ds, val_ds = train_val_datasets(cfg.data, cfg.seed)
    val_count = 0
    if val_ds is not None:
        # The hash hold-out reads every shard to find its rows: do it once here, not every validation.
        val_ds = val_ds.materialize()
        val_count = val_ds.count()
        if val_count < tc.num_workers:
            _log(
                f"only {val_count} validation latents for {tc.num_workers} workers: reporting the training "
                "loss as val_mse"
            )
            val_ds, val_count = None, 0
    train_count = manifest.count if cfg.data.val_shards else manifest.count - val_count
    per_worker_rows = train_count // tc.num_workers  # Ray Train splits evenly (equal=True)
    spe = tc.steps_per_epoch or per_worker_rows // micro
    if spe < 1:
        raise ConfigError(
            f"{train_count} training latents over {tc.num_workers} workers do not fill one batch of "
            f"{micro} per worker: lower train.batch_size (global {tc.batch_size}) or add data"
        )
    total = tc.epochs * spe
    if tc.max_steps:
        total = min(total, tc.max_steps)

    storage = _abs(storage_path or cfg.output_dir)
    name = run_name or cfg.name
    if _is_uri(storage):
        run_dir = str(Path.home() / ".cache" / "revq_ray" / "runs" / name)
    else:
        run_dir = str(Path(storage) / name)
    datasets = {"train": train_ds}
    if val_ds is not None:
        datasets["val"] = val_ds
    _log(
        f"data {cfg.data.shards}: {train_count} train / {val_count} val latents of shape "
        f"{manifest.latent_shape} "
        f"({time.time() - t0:.1f}s to plan)"
    )
    return {
        "latent_shape": list(manifest.latent_shape),
        "has_logvar": bool(manifest.has_logvar),
        "stats": manifest.stats,
        "vae": manifest.vae,
        "train_count": train_count,
        "val_count": val_count,
        "has_val": val_ds is not None,
        "micro_batch": micro,
        "steps_per_epoch": spe,
        "total_steps": total,
        "storage_path": storage,
        "name": name,
        "run_dir": run_dir,
        "_datasets": datasets,
    }


def resolve_paths(cfg: RunConfig) -> RunConfig:
    """A copy of ``cfg`` with local paths made absolute."""
    data = cfg.data.model_copy(
        update={"shards": _abs(cfg.data.shards), "val_shards": _abs(cfg.data.val_shards)}
    )
    return cfg.model_copy(update={"data": data, "output_dir": _abs(cfg.output_dir)})


def worker_env(cfg: RunConfig) -> dict[str, str]:
    """Environment of the training workers (DeepSpeed's accelerator and op cache, thread count)."""
    env = {
        "TORCH_EXTENSIONS_DIR": os.environ.get("TORCH_EXTENSIONS_DIR", str(DEFAULT_EXTENSIONS_DIR)),
        "OMP_NUM_THREADS": str(cfg.train.torch_threads),
        # Our progress line is printed once; Ray Train's print patch would log it a second time.
        "RAY_TRAIN_ENABLE_PRINT_PATCH": "0",
    }
    if not cfg.train.use_gpu:
        env["DS_ACCELERATOR"] = "cpu"
    return env


# --------------------------------------------------------------------------------------------- builder
def build_trainer(
    cfg: RunConfig,
    *,
    storage_path: str | None = None,
    run_name: str | None = None,
    callbacks: Sequence[Any] = (),
) -> TorchTrainer:
    """The ``TorchTrainer`` for ``cfg`` (starts or joins Ray if needed). Call ``.fit()`` on it.

    Args:
        cfg: the run's config.
        storage_path: Ray Train storage folder (default ``cfg.output_dir``); local path or URI.
        run_name: run name under it (default ``cfg.name``); the same name resumes.
        callbacks: Ray Train ``UserCallback`` instances, e.g. Tune's
            ``ray.tune.integration.ray_train.TuneReportCallback()`` inside a Tune trial.
    """
    os.environ.setdefault("RAY_TRAIN_V2_ENABLED", "1")
    # Ray Train gives a worker group 60 s to start, then fails the run. On a busy machine (2 cores shared by
    # Ray Data, Tune trials and other jobs) starting a worker takes longer; the driver's value is propagated
    # to the controller. An autoscaling cluster that must first add a node needs minutes too.
    os.environ.setdefault("RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S", "900")
    import ray.train
    from ray.train.torch import TorchTrainer

    init_ray()
    quiet_data_progress()
    cfg = resolve_paths(cfg)
    _ensure_shards(cfg)
    plan = plan_run(cfg, storage_path=storage_path, run_name=run_name)
    datasets = plan.pop("_datasets")
    tc = cfg.train
    resources = {"CPU": tc.cpus_per_worker, **tc.resources_per_worker}
    if tc.use_gpu:
        resources.setdefault("GPU", 1)
    return TorchTrainer(
        _train_fn,
        train_loop_config={"cfg": cfg.model_dump(mode="json"), "plan": plan},
        scaling_config=ray.train.ScalingConfig(
            num_workers=tc.num_workers, use_gpu=tc.use_gpu, resources_per_worker=resources
        ),
        run_config=ray.train.RunConfig(
            name=plan["name"],
            storage_path=plan["storage_path"],
            failure_config=ray.train.FailureConfig(max_failures=tc.max_failures),
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=tc.keep_checkpoints),
            callbacks=list(callbacks),
            worker_runtime_env={"env_vars": worker_env(cfg)},
        ),
        datasets=datasets,
    )


def _train_fn(config: dict[str, Any]) -> None:
    # Imported inside the worker so the driver never imports DeepSpeed.
    from revq_ray.train.loop import train_loop_per_worker

    train_loop_per_worker(config)


def run(
    cfg: RunConfig,
    *,
    storage_path: str | None = None,
    run_name: str | None = None,
    callbacks: Sequence[Any] = (),
) -> ray.train.Result:
    """Train ``cfg`` to the end (or resume it) and return Ray Train's ``Result``; ``result.metrics`` holds the
    last report of rank 0, including ``val_mse`` and ``run_dir``."""
    trainer = build_trainer(cfg, storage_path=storage_path, run_name=run_name, callbacks=callbacks)
    return trainer.fit()


# --------------------------------------------------------------------------------------------- CLI
def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m revq_ray.train",
        description="Train a quantizer + rectifier on VAE latent shards with Ray Train + DeepSpeed.",
        epilog=(
            "Examples:\n"
            "  python -m revq_ray.train --config configs/debug.yaml\n"
            "  python -m revq_ray.train --config configs/imagenet_512T.yaml --set train.num_workers=4\n"
            "  ray job submit --working-dir . -- python -m revq_ray.train --config configs/debug.yaml\n"
            "Re-running with the same name resumes from its last checkpoint."
        ),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--config", required=True, help="a preset YAML (configs/*.yaml)")
    p.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a config value, e.g. --set train.epochs=2 (repeatable)",
    )
    p.add_argument(
        "--address",
        default=None,
        help="Ray cluster to join ('auto' = the one running here); default $RAY_ADDRESS, else local",
    )
    p.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m revq_ray.train``; returns the exit code."""
    args = _parser().parse_args(list(sys.argv[1:] if argv is None else argv))
    try:
        cfg = load_config(args.config, args.overrides)
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    if args.print_config:
        print(dump_config(cfg), end="")
        return 0
    init_ray(args.address)
    try:
        result = run(cfg)
    except (ConfigError, FileNotFoundError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    m = result.metrics or {}
    val = m.get("val_mse", float("nan"))
    _log(
        f"finished {cfg.name}: step {m.get('step')}, val_mse {val:.5f} (without rectifier "
        f"{m.get('val_mse_norect', math.nan):.5f}), usage {100 * m.get('usage_mean', math.nan):.1f}%"
    )
    _log(f"run dir {m.get('run_dir')}; model: {m.get('run_dir')}/export/best (and export/latest)")
    return 0
