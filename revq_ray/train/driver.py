"""The training driver: config -> Ray -> ``TorchTrainer`` -> ``Result``.

One builder, :func:`build_trainer`, serves both ``python -m revq_ray.train`` (through :func:`run`) and the
Tune driver (one Train run per trial, with ``callbacks=[TuneReportCallback()]``).

Where things go (``R = <output_dir>/<name>``, the Ray Train storage folder of the run)::

    R/checkpoint_step000001234/   checkpoints and R/export/{latest,best}: revq_ray/train/checkpoint.py says
                                  how and when (its Checkpointer writes them all)
    R/metrics.csv, R/tensorboard/ metrics of rank 0 (committed timeline: resumed steps are not listed twice)
    R/config.json, R/starts.csv
    R/workers.json                where each rank ran: node, host, pid, its parameters' device, DeepSpeed's
                                  accelerator (cuda / cpu)

Re-running with the same ``name`` and ``output_dir`` resumes from the last checkpoint (Ray Train V2 restores
the run's checkpoint history from ``R``). ``output_dir`` may be a URI (s3://, gs://): checkpoints then live
there too: rank 0 writes the CSV/TensorBoard logs, exports and run files into a local folder standing for
the run (``~/.cache/revq_ray/runs/...``) and mirrors it to ``R`` at every checkpoint and export and at the
end; a restarted rank 0 on any node fetches it back first.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from revq_ray.config import ConfigError, RunConfig, dump_config, load_config
from revq_ray.runtime import add_set_argument, extensions_dir, get_logger, init_ray
from revq_ray.train.identity import check_run_identity
from revq_ray.train.plan import check_storage, ensure_shards, plan_run, resolve_paths

__all__ = [
    "build_trainer",
    "run",
    "main",
    "worker_env",
]

if TYPE_CHECKING:  # pragma: no cover
    import ray.train
    from ray.train.torch import TorchTrainer


_log = get_logger("revq_ray.train").info


# --------------------------------------------------------------------------------------------- ray
def quiet_data_progress() -> None:
    """Ray Data's per-operator progress bars flood job logs; the training loop prints its own progress."""
    from ray.data import DataContext

    ctx = DataContext.get_current()
    ctx.enable_progress_bars = False
    ctx.print_on_execution_start = False


def worker_env(cfg: RunConfig) -> dict[str, str]:
    """Environment of the training workers (DeepSpeed's accelerator and op cache, thread count)."""
    env = {
        "TORCH_EXTENSIONS_DIR": str(extensions_dir()),
        "OMP_NUM_THREADS": str(cfg.train.torch_threads),
        # Our progress line is printed once; Ray Train's print patch would log it a second time.
        "RAY_TRAIN_ENABLE_PRINT_PATCH": "0",
    }
    # Always set, never inherited: a local Ray hands the driver's environment to its workers, so a driver
    # that says DS_ACCELERATOR=cpu (the test suite, a CPU-only habit) would otherwise give GPU workers
    # DeepSpeed's CPU accelerator (its CPU comm op, gloo) while the model sits on CUDA.
    env["DS_ACCELERATOR"] = "cuda" if cfg.train.use_gpu else "cpu"
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

    check_storage(cfg)  # an unusable URI fails here, in seconds, before Ray starts
    init_ray()
    quiet_data_progress()
    cfg = resolve_paths(cfg)
    ensure_shards(cfg)
    plan, datasets = plan_run(cfg, storage_path=storage_path, run_name=run_name)
    check_run_identity(cfg, plan.storage_path, plan.name)  # before any worker touches the run
    # The workers resume from the newest complete checkpoint in storage (revq_ray.train.checkpoint), not from
    # Ray Train's list of reported ones, which lags behind storage after a kill and names pruned folders.
    from revq_ray.train.checkpoint import forget_ray_history

    forget_ray_history(plan.storage_path, plan.name)
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
            name=plan.name,
            storage_path=plan.storage_path,
            failure_config=ray.train.FailureConfig(max_failures=tc.max_failures),
            # Every checkpoint stays registered with Ray: the trainer itself prunes storage to
            # train.keep_checkpoints complete ones (revq_ray.train.checkpoint.prune), after interruptions too.
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=None),
            callbacks=list(callbacks),
            worker_runtime_env={"env_vars": worker_env(cfg)},
        ),
        datasets=datasets,
    )


def _train_fn(config: dict[str, Any]) -> None:
    # Imported inside the worker so the driver never imports DeepSpeed.
    from revq_ray.train.jit import load_deepspeed_ops
    from revq_ray.train.loop import train_loop_per_worker

    load_deepspeed_ops()  # under an owner lock: a killed earlier build cannot block this worker
    train_loop_per_worker(config)


def run(
    cfg: RunConfig,
    *,
    storage_path: str | None = None,
    run_name: str | None = None,
    callbacks: Sequence[Any] = (),
    address: str | None = None,
) -> ray.train.Result:
    """Train ``cfg`` to the end (or resume it) and return Ray Train's ``Result``; ``result.metrics`` holds the
    last report of rank 0, including ``val_mse`` and ``run_dir``.

    The run folder is owned while this runs (:class:`~revq_ray.train.run_lock.RunLock`): a second start of
    the same name and output folder raises :class:`~revq_ray.train.run_lock.RunLockedError` naming the
    owner, before touching anything: Ray included (joined or started here, at ``address``, only once the
    lock is held, unless the caller already did)."""
    import ray

    from revq_ray.runtime import absolute
    from revq_ray.train.run_lock import RunLock

    with RunLock(absolute(storage_path or cfg.output_dir), run_name or cfg.name):
        if not ray.is_initialized():
            init_ray(address)
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
    add_set_argument(p, help="override a config value, e.g. --set train.epochs=2 (repeatable)")
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
    try:
        check_storage(cfg)  # an unusable URI fails in seconds, before Ray starts
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    from revq_ray.train.run_lock import RunLockedError

    try:
        result = run(cfg, address=args.address)
    except (ConfigError, FileNotFoundError, ValueError, RunLockedError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except Exception as err:  # a failed run (e.g. a non-finite loss): its cause in one line, exit 1
        from revq_ray.train.guards import failure_message

        print(f"error: {failure_message(err)}", file=sys.stderr)
        return 1
    if getattr(result, "error", None) is not None:
        from revq_ray.train.guards import failure_message

        print(f"error: {failure_message(result.error)}", file=sys.stderr)
        return 1
    m = result.metrics or {}
    val = m.get("val_mse", float("nan"))
    _log(
        f"finished {cfg.name}: step {m.get('step')}, val_mse {val:.5f} (without rectifier "
        f"{m.get('val_mse_norect', math.nan):.5f}), usage {100 * m.get('usage_mean', math.nan):.1f}%"
    )
    from revq_ray.train.checkpoint import existing_exports

    exports = " and ".join(existing_exports(m.get("run_dir"))) or "no export"
    _log(f"run dir {m.get('run_dir')}; model: {exports}")
    return 0
