"""Training the prior: config -> token dataset -> Ray -> ``TorchTrainer`` -> ``Result``, like
``python -m revq_ray.train`` (the same run folder, lock, identity check, checkpoints and resume).

    python -m revq_ray.prior --config configs/prior_fashion_mnist.yaml [--set key=value ...]
    revq-ray prior --config configs/prior_debug.yaml --set data.tokens=runs/tokens

Where things go (``R = <output_dir>/<name>``)::

    R/checkpoint_step000001234/   DeepSpeed checkpoints (complete.json last), the newest keep_checkpoints
    R/export/latest, R/export/best   PriorTransformer.save_pretrained: what `revq-ray sample --prior` loads
    R/metrics.csv, R/tensorboard/, R/steps.log, R/starts.csv, R/config.json, R/run_identity.json, R/owner.json

Re-running the same ``name`` and ``output_dir`` resumes from the newest complete checkpoint, when the model,
the recipe and the token dataset (its manifest's sha256) are the same; otherwise it stops naming what differs.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from revq_ray.config import ConfigError, dump_config
from revq_ray.prior.config import PriorRunConfig, load_prior_config
from revq_ray.prior.data import TokenData, TokenDataError, load_token_dataset, prior_tokenizer_identity
from revq_ray.runtime import absolute, add_set_argument, get_logger, init_ray, is_uri, join_location

if TYPE_CHECKING:  # pragma: no cover
    import ray.train
    from ray.train.torch import TorchTrainer

    from revq_ray.prior.loop import PriorPlan

__all__ = ["build_trainer", "run", "main", "plan_prior", "run_identity"]

_log = get_logger("revq_ray.prior").info

# Keys that may change when a run resumes (how long, where, on what); the rest must match.
MAY_CHANGE = frozenset(
    {
        "name",
        "output_dir",
        "data.tokens",
        "train.num_workers",
        "train.use_gpu",
        "train.cpus_per_worker",
        "train.torch_threads",
        "train.epochs",
        "train.max_steps",
        "train.log_every",
        "train.val_every",
        "train.checkpoint_every",
        "train.keep_checkpoints",
        "train.max_failures",
        "train.fail_at_step",
        "train.resources_per_worker",
        "train.force_resume",
    }
)


def run_identity(cfg: PriorRunConfig, data: TokenData) -> dict[str, Any]:
    """What must match for a checkpoint of ``cfg``'s run to be resumed: the settings (but
    :data:`MAY_CHANGE`) and the token dataset's manifest (sha256), whatever folder it is in."""
    from revq_ray.train.identity import _flatten

    flat = _flatten(cfg.model_dump(mode="json"), keep=MAY_CHANGE)
    ident = {k: v for k, v in flat.items() if k not in MAY_CHANGE}
    ident["data.tokens (manifest sha256)"] = data.manifest_sha256
    return ident


def model_spec(cfg: PriorRunConfig, data: TokenData) -> dict[str, Any]:
    """The :class:`~revq_ray.prior.model.PriorSpec` fields for ``cfg`` on ``data``."""
    m = cfg.model
    if m.embedding == "codebook" and data.codebooks_tkd is None:
        raise TokenDataError(
            f"{data.path}/manifest.json: field 'codebooks' is missing (no codebooks.safetensors), but "
            "model.embedding=codebook embeds each code's vector: re-tokenize with a revq-ray that exports "
            "them, or set model.embedding=table"
        )
    return {
        "tokens": data.tokens,
        "codebook_size": data.codebook_size,
        "num_classes": data.num_classes,
        "d_model": m.d_model,
        "layers": m.layers,
        "heads": m.heads,
        "mlp_ratio": m.mlp_ratio,
        "dropout": m.dropout,
        "embedding": m.embedding,
        "head": m.head,
        "cfg_dropout": m.cfg_dropout,
        "code_dim": int(data.codebooks_tkd.shape[-1]) if m.embedding == "codebook" else 0,
    }


def check_tokens_location(cfg: PriorRunConfig) -> None:
    """Seconds, before Ray starts: ``data.tokens`` names a token dataset (a folder with manifest.json, or a
    URI, checked when it is read), else a ConfigError naming the field and the fix."""
    from pathlib import Path

    if not cfg.data.tokens:
        raise ConfigError(
            "data.tokens is empty: point it at a `revq-ray tokenize` output directory (--set data.tokens=DIR)"
        )
    if not is_uri(cfg.data.tokens) and not (Path(cfg.data.tokens) / "manifest.json").is_file():
        raise ConfigError(
            f"data.tokens={cfg.data.tokens}: no manifest.json there, so it is not a token dataset; write one "
            "with `revq-ray tokenize --model TOKENIZER --input IMAGES --output DIR`"
        )


def plan_prior(
    cfg: PriorRunConfig, *, storage_path: str | None = None, run_name: str | None = None
) -> tuple[PriorPlan, TokenData]:
    """Read and check the token dataset, size the run, put its arrays in Ray's object store (Ray is up)."""
    import numpy as np
    import ray

    from revq_ray.data.fs import cache_dir
    from revq_ray.prior.loop import PriorPlan
    from revq_ray.train.engine import per_worker_batch

    check_tokens_location(cfg)
    m = cfg.model
    data = load_token_dataset(
        cfg.data.tokens,
        conditional=m.conditional,
        val_items=cfg.data.val_items,
        augmented=cfg.data.augmented,
        limit=cfg.data.limit,
    )
    for note in data.notes:
        _log(note)
    spec = model_spec(cfg, data)
    tc = cfg.train
    micro = per_worker_batch(tc)  # type: ignore[arg-type]  (same field names as TrainConfig)
    n_train, n_val = int((~data.val).sum()), int(data.val.sum())
    spe = (n_train // tc.num_workers) // micro
    if spe < 1:
        raise ConfigError(
            f"{n_train} training images over {tc.num_workers} workers do not fill one batch of {micro} per "
            f"worker: lower train.batch_size (global {tc.batch_size}) or data.val_items, or add data"
        )
    total = min(tc.epochs * spe, tc.max_steps) if tc.max_steps else tc.epochs * spe
    storage = absolute(storage_path or cfg.output_dir)
    name = run_name or cfg.name
    run_uri = join_location(storage, name) if is_uri(storage) else None
    run_dir = str(cache_dir(run_uri, "runs")) if run_uri else os.path.join(storage, name)
    meta = {
        "tokenizer": prior_tokenizer_identity(data),
        "class_names": data.class_names,
        "conditional": data.conditional,
        "dataset": {"path": data.path, "manifest_sha256": data.manifest_sha256, "vocab": data.vocab},
    }
    arrays = {
        "ids": data.ids.astype(np.int32),
        "labels": data.labels,
        "val": data.val,
        "codebooks": data.codebooks_tkd if m.embedding == "codebook" else None,
    }
    plan = PriorPlan(
        spec=spec,
        meta=meta,
        data=ray.put(arrays),
        train_count=n_train,
        val_count=n_val,
        micro_batch=micro,
        steps_per_epoch=spe,
        total_steps=total,
        storage_path=storage,
        name=name,
        run_dir=run_dir,
        run_uri=run_uri,
    )
    _log(
        f"tokens {data.path}: {n_train} train / {n_val} val images, T={data.tokens} K={data.codebook_size}, "
        f"{'conditional on ' + str(data.num_classes) + ' classes' if data.conditional else 'unconditional'}"
    )
    return plan, data


def build_trainer(
    cfg: PriorRunConfig,
    *,
    storage_path: str | None = None,
    run_name: str | None = None,
    callbacks: Sequence[Any] = (),
) -> TorchTrainer:
    """The ``TorchTrainer`` of the prior run ``cfg`` (starts or joins Ray if needed); ``.fit()`` it."""
    os.environ.setdefault("RAY_TRAIN_V2_ENABLED", "1")
    os.environ.setdefault("RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S", "900")
    import ray.train
    from ray.train.torch import TorchTrainer

    from revq_ray.train.checkpoint import forget_ray_history
    from revq_ray.train.driver import worker_env
    from revq_ray.train.identity import check_identity

    init_ray()
    plan, data = plan_prior(cfg, storage_path=storage_path, run_name=run_name)
    defaults = run_identity(PriorRunConfig(), data)
    check_identity(
        run_identity(cfg, data), plan.storage_path, plan.name, force=cfg.train.force_resume, defaults=defaults
    )
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
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=None),  # the Checkpointer prunes
            callbacks=list(callbacks),
            worker_runtime_env={"env_vars": worker_env(cfg)},  # type: ignore[arg-type]
        ),
    )


def _train_fn(config: dict[str, Any]) -> None:
    from revq_ray.prior.loop import train_loop_per_worker
    from revq_ray.train.jit import load_deepspeed_ops

    load_deepspeed_ops()
    train_loop_per_worker(config)


def run(
    cfg: PriorRunConfig,
    *,
    storage_path: str | None = None,
    run_name: str | None = None,
    callbacks: Sequence[Any] = (),
    address: str | None = None,
) -> ray.train.Result:
    """Train the prior to the end (or resume it) and return Ray Train's ``Result`` (``result.metrics``: the
    last report of rank 0, ``val_loss`` and ``run_dir`` included). Holds the run folder's owner lock."""
    import ray

    from revq_ray.train.run_lock import RunLock

    check_tokens_location(cfg)  # before the lock and Ray
    with RunLock(absolute(storage_path or cfg.output_dir), run_name or cfg.name):
        if not ray.is_initialized():
            init_ray(address)
        trainer = build_trainer(cfg, storage_path=storage_path, run_name=run_name, callbacks=callbacks)
        return trainer.fit()


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m revq_ray.prior",
        description="Train a class-conditional transformer prior on a token dataset (Ray Train + DeepSpeed).",
        epilog=(
            "Examples:\n"
            "  python -m revq_ray.prior --config configs/prior_fashion_mnist.yaml\n"
            "  python -m revq_ray.prior --config configs/prior_debug.yaml --set data.tokens=runs/tokens\n"
            "Re-running with the same name resumes from its newest complete checkpoint.\n"
            "Then: revq-ray sample --prior runs/<name> --tokenizer TOKENIZER --classes 0,1 --n 8 --output DIR"
        ),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--config", required=True, help="a prior preset (configs/prior_*.yaml)")
    add_set_argument(p, help="override a config value, e.g. --set train.epochs=2 (repeatable)")
    p.add_argument("--address", default=None, help="Ray cluster to join; default $RAY_ADDRESS, else local")
    p.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m revq_ray.prior`` / ``revq-ray prior``; returns the exit code."""
    args = _parser().parse_args(list(sys.argv[1:] if argv is None else argv))
    try:
        cfg = load_prior_config(args.config, args.overrides)
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    if args.print_config:
        print(dump_config(cfg), end="")
        return 0
    from revq_ray.train.run_lock import RunLockedError

    try:
        result = run(cfg, address=args.address)
    except (ConfigError, FileNotFoundError, ValueError, RunLockedError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except Exception as err:  # a failed run: its cause in one line
        from revq_ray.train.guards import failure_message

        print(f"error: {failure_message(err)}", file=sys.stderr)
        return 1
    if getattr(result, "error", None) is not None:
        from revq_ray.train.guards import failure_message

        print(f"error: {failure_message(result.error)}", file=sys.stderr)
        return 1
    m = result.metrics or {}
    _log(
        f"finished {cfg.name}: step {m.get('step')}, val_loss {m.get('val_loss', math.nan):.4f} nats/token "
        f"({m.get('val_bits', math.nan):.0f} bits/image); run dir {m.get('run_dir')}"
    )
    return 0
