"""The per-worker training loop (runs inside every Ray Train worker).

Reads like nanoGPT's::

    run = setup(config)                      # model (codebook init on CPU, then to the device), data, engine,
    while not run.schedule.done(run.state):  # restore
        batch = next(run.batches)
        train_step(run, batch)               # forward, backward, per-module clip, optimizer step
        due = run.schedule.advance(run.state, run.samples_per_step)
        if due.any:
            after_step(run, due)             # reset, validate, report; checkpoint and export (Checkpointer)
    finish(run)

Data and epochs. Each worker streams its split of the training set (``get_dataset_shard("train")``, split
evenly by Ray Train). An *epoch* is a fixed number of optimizer steps, ``steps_per_epoch``, computed by the
driver as one pass over the training split; the stream itself is endless (a new, reshuffled pass starts
whenever one ends), so epochs and passes coincide when the counts are exact and nothing hangs when they
are not (all workers hold the same number of rows, so they start new passes at the same step).

Resuming mid-epoch. A checkpoint stores ``step``, ``epoch`` and ``step_in_epoch``. A restored worker group
continues the step counter and finishes the interrupted epoch with exactly its remaining
``steps_per_epoch - step_in_epoch`` steps, drawn from a fresh shuffled pass over the data (a streaming
source cannot seek to the sample it stopped at). So no optimizer step is done twice or skipped and no epoch
is lost or added; what is not guaranteed is that the rest of an interrupted epoch sees exactly the samples it
would have seen. Steps done after the last checkpoint and before a failure are rolled back and redone (the
logs drop them too, see :mod:`revq_ray.train.logs`).

Devices and precision. The model is built and its codebook initialized on the CPU, then moved to the
worker's device, so nothing CPU-side meets a CUDA module. Under ``train.precision=bf16`` DeepSpeed wraps the
forward in autocast; the quantizer switches it off around the search, gather and its losses (fp32, the
same codes as the Tokenizer), so only the rectifier runs in bf16. The hot loop never waits for the device:
losses and gradient norms stay device tensors until a report needs them.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import shutil
import socket
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from revq_ray.config import RunConfig
from revq_ray.runtime import get_logger
from revq_ray.train import checkpoint as ckpt
from revq_ray.train import engine as eng
from revq_ray.train.logs import Reporter
from revq_ray.train.plan import RunPlan
from revq_ray.train.schedule import Due, Schedule

FAIL_MARKER = ".fail_at_step.done"


_log = get_logger("revq_ray.train").info


class Collectives:
    """The collectives the loop needs, no-ops in a single process."""

    def __init__(self, device: torch.device):
        import torch.distributed as dist

        self.dist = dist
        self.on = dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1
        self.device = device

    def sum_(self, t: torch.Tensor) -> torch.Tensor:
        if self.on:
            self.dist.all_reduce(t, op=self.dist.ReduceOp.SUM)
        return t

    def sum_floats(self, values: list[float]) -> list[float]:
        t = torch.tensor(values, dtype=torch.float64, device=self.device)
        return self.sum_(t).tolist()

    def gather_objects(self, obj: Any) -> list[Any]:
        if not self.on:
            return [obj]
        out: list[Any] = [None] * self.dist.get_world_size()
        self.dist.all_gather_object(out, obj)
        return out


@dataclass
class Run:
    """Everything the loop holds for one worker."""

    cfg: RunConfig
    plan: RunPlan
    rank: int
    world: int
    device: torch.device
    coll: Collectives
    engine: Any
    group_names: list[str]
    state: ckpt.TrainerState
    schedule: Schedule
    reporter: Reporter
    checkpointer: ckpt.Checkpointer
    batches: Iterator[dict[str, torch.Tensor]]
    val_shard: Any = None
    rows: Any = None  # the codebook's own row exchange + optimizer (train.codebook_update rows*), else None
    norms: dict[str, torch.Tensor] = field(default_factory=dict)
    lr: float = 0.0
    lrs: dict[str, float] = field(default_factory=dict)
    last_val: tuple[float, float] | None = None
    reporter_last_comm_step: int = 0

    @property
    def module(self) -> Any:
        return self.engine.module

    @property
    def samples_per_step(self) -> int:
        return self.plan.micro_batch * self.world


def seed_for(cfg: RunConfig, what: int, index: int) -> int:
    """Distinct, reproducible random streams: the same on every rank and after every restart."""
    return (cfg.seed * 1_000_003 + what * 7_919 + index) % (2**63 - 1)


# --------------------------------------------------------------------------------------------- setup
def build_model(
    cfg: RunConfig, plan: RunPlan, init_tokens_ntd: torch.Tensor | None, device: Any, *, fresh: bool = True
) -> Any:
    """The ReVQModel on ``device``: standardizer from the plan's statistics; on a ``fresh`` run (no
    checkpoint to restore) every tensor from ``model.init_from`` if set, else the codebook initialized from
    ``init_tokens_ntd``; all on the CPU, before the move to the device."""
    from revq_ray.core.model import ReVQModel
    from revq_ray.core.stats import RunningStats

    torch.manual_seed(cfg.seed)
    model = ReVQModel.from_config(plan.latent_shape, cfg.model)
    model.standardizer.set_stats(RunningStats.from_state_dict(plan.stats))
    if plan.channel_weights is not None:  # model.weighting: decoder (a restored checkpoint holds its own)
        model.set_channel_weights(torch.tensor(plan.channel_weights))
    if not fresh:
        pass  # the checkpoint restores every tensor
    elif cfg.model.init_from:  # fine-tune: every tensor from the saved model
        from revq_ray.published import load_init_weights

        load_init_weights(model, cfg.model.init_from, log=_log)
    elif init_tokens_ntd is None:
        raise RuntimeError("a fresh run needs a codebook-init sample (RunPlan.init_tokens) or init_from")
    else:
        t0 = time.perf_counter()
        z = model.to_latent(init_tokens_ntd.to(model.standardizer.mean.dtype))
        gen = torch.Generator().manual_seed(seed_for(cfg, 1, 0))
        model.init_codebook(z, generator=gen)
        _log(
            f"codebook init ({cfg.model.quantizer.init}) from {init_tokens_ntd.shape[0]} sampled tokens per "
            f"group in {time.perf_counter() - t0:.1f}s"
        )
    return model.to(device)


def _device(cfg: RunConfig) -> torch.device:
    if not cfg.train.use_gpu:
        return torch.device("cpu")
    import ray.train.torch

    return ray.train.torch.get_device()


def endless_batches(shard: Any, micro: int, cfg: RunConfig, device: torch.device) -> Iterator[dict[str, Any]]:
    """Batches of ``micro`` latents from this worker's split, pass after pass, already on ``device`` (Ray
    copies them from pinned host memory in its prefetch thread when the device is a GPU)."""
    while True:
        got = 0
        for batch in shard.iter_torch_batches(
            batch_size=micro,
            dtypes=torch.float32,
            device=device,
            pin_memory=device.type == "cuda",
            drop_last=True,
            local_shuffle_buffer_size=cfg.data.shuffle_buffer or None,
            prefetch_batches=cfg.data.prefetch_batches,
        ):
            got += 1
            yield batch
        if got == 0:
            raise RuntimeError(
                f"this worker's split of the training data holds fewer than one batch of {micro} latents: "
                "lower train.batch_size or train.num_workers, or add data"
            )


def _accelerator_name() -> str:
    """DeepSpeed's accelerator on this worker ("cuda", "cpu"): what its collectives and ops run on."""
    from deepspeed.accelerator import get_accelerator

    return get_accelerator().device_name()


def check_accelerator(device: torch.device, accelerator: str) -> None:
    """Fail early when DeepSpeed's accelerator does not match the worker's device: a CUDA model under
    DeepSpeed's CPU accelerator still trains (gloo collectives, the CPU comm op), slowly and silently."""
    if device.type != accelerator:
        raise RuntimeError(
            f"DeepSpeed's accelerator is {accelerator!r} but the model is on {device} "
            f"(DS_ACCELERATOR={os.environ.get('DS_ACCELERATOR')!r} in this worker): the driver sets "
            "DS_ACCELERATOR from train.use_gpu (revq_ray.train.driver.worker_env); a runtime_env or "
            "cluster setting that overrides it must agree with train.use_gpu"
        )


def _write_run_files(run: Run, config: dict[str, Any]) -> None:
    """Rank 0: workers.json (where every rank runs), config.json, and the start line."""
    import ray

    me = {"rank": run.rank, "node_id": ray.get_runtime_context().get_node_id(), "host": socket.gethostname(),
          "pid": os.getpid(), "param_device": str(next(run.module.parameters()).device),
          "accelerator": _accelerator_name()}  # fmt: skip
    workers = run.coll.gather_objects(me)
    if run.rank != 0:
        return
    run_dir = Path(run.plan.run_dir)
    (run_dir / "workers.json").write_text(json.dumps(workers, indent=1))
    (run_dir / "config.json").write_text(json.dumps(config["cfg"], indent=1))
    n_params = {k: sum(p.numel() for p in v) for k, v in run.module.param_groups().items()}
    tc, plan = run.cfg.train, run.plan
    _log(
        f"{run.world} worker(s), ZeRO {tc.zero_stage}, "
        f"{'bf16 autocast (rectifier)' if eng.resolve_precision(tc) == 'bf16' else 'fp32'} on "
        f"{run.device.type}; params codebook {n_params['codebook']:,} rectifier {n_params['rectifier']:,}; "
        f"{plan.total_steps} steps = {plan.total_steps / plan.steps_per_epoch:.2f} epochs of "
        f"{plan.steps_per_epoch} steps x {run.samples_per_step} latents; run dir {run_dir}"
    )


def setup(config: dict[str, Any]) -> Run:
    """Build the worker's model, engine, data stream and logs; restore a checkpoint if Ray Train has one."""
    import ray
    import ray.train

    cfg = RunConfig.model_validate(config["cfg"])
    plan: RunPlan = config["plan"]
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    torch.set_num_threads(cfg.train.torch_threads)
    device = _device(cfg)
    check_accelerator(device, _accelerator_name())
    coll = Collectives(device)
    t0 = time.perf_counter()
    checkpointer = ckpt.Checkpointer(
        rank, world, coll.gather_objects, storage=plan.storage_path, name=plan.name, run_dir=plan.run_dir,
        keep=cfg.train.keep_checkpoints,
    )  # fmt: skip
    resuming = checkpointer.resuming
    # Every rank gets the same sample from the object store and initializes identically (deterministic);
    # DeepSpeed's initial broadcast of rank 0's parameters then changes nothing.
    init = None if resuming or plan.init_tokens is None else ray.get(plan.init_tokens)
    model = build_model(cfg, plan, init, device, fresh=not resuming)
    model.set_reduce_fn(coll.sum_)
    engine, group_names, rows = eng.build_engine(model, cfg.train, world)
    if rank == 0:
        _log(
            f"DeepSpeed engine ready: worker setup (model, init, engine) in {time.perf_counter() - t0:.1f}s; "
            f"codebook update {rows.mode if rows is not None else 'dense'}"
        )
    state = checkpointer.restore(engine, rows)
    reset_cfg = cfg.model.quantizer.reset
    schedule = Schedule(
        cfg.train, reset_cfg, plan.steps_per_epoch, plan.total_steps, resets_on=reset_cfg.enabled
    )
    if rank == 0 and plan.run_uri:
        fetch_run_dir(plan)
    Path(plan.run_dir).mkdir(parents=True, exist_ok=True)
    reporter = Reporter(
        run_dir=Path(plan.run_dir), run_location=plan.run_uri, rank=rank,
        samples_per_step=plan.micro_batch * world, total_steps=plan.total_steps,
        steps_per_epoch=plan.steps_per_epoch, start_step=state.step,
        device=device, reduce_floats=coll.sum_floats,
    )  # fmt: skip
    run = Run(
        cfg=cfg, plan=plan, rank=rank, world=world, device=device, coll=coll, engine=engine,
        group_names=group_names, state=state, schedule=schedule, reporter=reporter, checkpointer=checkpointer,
        batches=endless_batches(ray.train.get_dataset_shard("train"), plan.micro_batch, cfg, device),
        val_shard=ray.train.get_dataset_shard("val") if plan.has_val else None,
        rows=rows, reporter_last_comm_step=state.step,
    )  # fmt: skip
    _write_run_files(run, config)
    return run


# --------------------------------------------------------------------------------------------- object store
# Ray Train keeps the checkpoints in storage itself; the rest of a run folder (metrics.csv, TensorBoard, the
# exports, config/workers/starts files) is written by rank 0 into the local ``plan.run_dir`` and mirrored to
# ``plan.run_uri`` when a checkpoint or an export is made and at the end, so the object store holds the logs
# of the committed timeline. A restarted rank 0 (any node) first fetches that mirror back.
_NOT_MIRRORED = ("ranks",)  # per-rank test exports stay on their nodes
# What rank 0 writes into a run folder (the rest of <storage>/<name> is Ray Train's and the identity file):
# only these come back from the store, so a stale copy of Ray's own files is never written over newer ones.
_MIRRORED = ("metrics.csv", "starts.csv", "steps.log", "tensorboard", "export", "config.json", "workers.json",
             FAIL_MARKER)  # fmt: skip


def fetch_run_dir(plan: RunPlan) -> None:
    """Rank 0, URI storage: replace the local run folder with the run's files in the object store (none for a
    new run), so logs continue where the checkpoint's timeline is, whichever node this rank runs on."""
    from revq_ray.data.fs import download_tree

    shutil.rmtree(plan.run_dir, ignore_errors=True)
    n = download_tree(plan.run_uri, plan.run_dir, only=_MIRRORED)
    if n:
        _log(f"fetched {n} run files from {plan.run_uri} into {plan.run_dir}")


def sync_run_dir(run: Run) -> None:
    """Rank 0, URI storage: copy the local run folder to ``plan.run_uri`` (small files; whole objects)."""
    if run.rank != 0 or not run.plan.run_uri:
        return
    from revq_ray.data.fs import upload_tree

    upload_tree(run.plan.run_dir, run.plan.run_uri, skip=_NOT_MIRRORED)


# --------------------------------------------------------------------------------------------- step
def train_step(run: Run, batch: dict[str, torch.Tensor]) -> None:
    """One optimizer step: lr, forward, backward (DeepSpeed's all-reduce; the codebook's row exchange),
    per-module clip, step. No host sync on the dense path (the row exchange reads the row counts)."""
    engine, tc, rows = run.engine, run.cfg.train, run.rows
    latents = batch["latent"].to(run.device, non_blocking=True)
    logvar = batch["logvar"].to(run.device, non_blocking=True) if "logvar" in batch else None
    run.lrs = eng.set_lrs(engine, run.group_names, rows, run.state.step, run.plan.total_steps,
                          tc.final_lr_fraction)  # fmt: skip
    run.lr = run.lrs.get("codebook", next(iter(run.lrs.values()), 0.0))
    out = engine(latents, logvar)
    eng.backward(engine, out.loss, rows)
    run.norms = eng.clip(engine, run.group_names, rows, tc.grad_clip)
    eng.step(engine, rows)
    run.reporter.add(run.state.step + 1, out.losses, out.loss)


@torch.no_grad()
def validate(run: Run) -> tuple[float, float]:
    """Collective: latent MSE in standardized units with and without the rectifier, over every worker's val
    split (with the training forward, so under the same autocast as training)."""
    module = run.module
    acc = torch.zeros(3, dtype=torch.float64, device=run.device)  # se, se without rectifier, count
    was = module.training
    module.eval()  # the quantizer does not count eval hits
    try:
        for batch in run.val_shard.iter_torch_batches(
            batch_size=run.plan.micro_batch, dtypes=torch.float32, device=run.device, drop_last=False
        ):
            logvar = batch.get("logvar")
            with eng.autocast(run.cfg.train, run.device):
                out = module(batch["latent"], logvar)
            target = out.latents_std.float()
            acc[0] += (out.rectified_std.float() - target).pow(2).sum().double()
            acc[1] += (out.quantized.float() - target).pow(2).sum().double()
            acc[2] += target.numel()
    finally:
        module.train(was)
    se, se_norect, n = run.coll.sum_(acc).tolist()
    return (se / n, se_norect / n) if n else (math.nan, math.nan)


# --------------------------------------------------------------------------------------------- after a step
def usage_and_reset(
    quantizer: Any, due: Due, generator: torch.Generator
) -> tuple[dict[str, torch.Tensor] | None, Any]:
    """Collective. The reset (if due) and the usage statistics since the last reset (if a report needs them)
    from ONE all-reduce of the (G, K) counts: a reset reduces them anyway and hands its statistics back.
    Returns ``(usage or None, reset report or None)``."""
    report = quantizer.maybe_reset(generator) if due.reset else None
    usage = report.usage if report is not None else None
    if usage is None and due.usage and not due.reset:
        usage = quantizer.usage_stats(reduce=True)
    return usage or None, report


def _usage_metrics(usage: dict[str, torch.Tensor] | None) -> dict[str, Any]:
    if not usage:
        return {}
    return {
        "usage_mean": float(usage["usage"].float().mean()),
        "usage_min": float(usage["usage"].float().min()),
        "perplexity": float(usage["perplexity"].float().mean()),
        "dead_codes": int(usage["dead"].sum()),
    }


def _comm_metrics(run: Run) -> dict[str, Any]:
    """Bytes this rank handed to gradient collectives per step: DeepSpeed's dense all-reduce (the gradient
    buffers it reduces: every parameter it trains) plus the codebook's row all-gathers (measured, averaged
    over the steps since the last report)."""
    from revq_ray.train.codebook import dense_grad_bytes

    dense = dense_grad_bytes([p for g in eng._group_params(run.engine) for p in g]) if run.world > 1 else 0
    out: dict[str, Any] = {"comm_dense_bytes": dense}
    if run.rows is not None:
        got = run.rows.comm_bytes()
        steps = max(run.state.step - run.reporter_last_comm_step, 1)
        out["comm_rows_bytes"] = got["sent"] / steps
        out["comm_rows_received_bytes"] = got["received"] / steps
        out["rows_touched"] = run.rows.rows_touched
    run.reporter_last_comm_step = run.state.step
    return out


def _val_metrics(run: Run, due: Due, means: dict[str, float]) -> tuple[dict[str, Any], bool]:
    """Validation entries of the metrics and whether ``val_mse`` improved on the best so far."""
    out: dict[str, Any] = {}
    if run.last_val is not None:
        out["val_mse"], out["val_mse_norect"] = run.last_val
    elif due.last:
        # No validation data (data.val_items=0 and no data.val_shards): the training loss stands in so that
        # a Tune objective exists; flagged so nobody mistakes it for held-out error.
        out.update(val_mse=means["loss_rect"], val_mse_norect=math.nan, val_source="train")
    state, improved = run.state, False
    val_now = out.get("val_mse", math.nan) if due.val else math.nan
    if math.isfinite(val_now) and (state.best_val_mse is None or val_now < state.best_val_mse):
        state.best_val_mse, improved = val_now, True
    if state.best_val_mse is not None:
        out["best_val_mse"] = state.best_val_mse
    return out, improved


def after_step(run: Run, due: Due) -> None:
    """Everything a due step asks for, in order: usage + reset, validation, report, checkpoint, exports."""
    gen = torch.Generator().manual_seed(seed_for(run.cfg, 2, run.state.step))
    usage, report = usage_and_reset(run.module.quantizer, due, gen)
    if report is not None:
        eng.apply_reset_to_optimizer(run.engine, report, run.rows)
        run.reporter.reset_codes += report.count
        run.state.resets += 1
    if due.val and run.val_shard is not None:
        run.last_val = validate(run)
    if not due.report:
        return
    means, ray_wants = run.reporter.close_window(run.state.step)
    val, improved = _val_metrics(run, due, means)
    metrics = run.reporter.metrics(
        run.state, means, lr=run.lr, lr_rectifier=run.lrs.get("rectifier") if "codebook" in run.lrs else None,
        **{f"grad_norm_{k}": float(v) for k, v in run.norms.items()}, **_usage_metrics(usage), **val,
        **_comm_metrics(run),
    )  # fmt: skip
    saving = due.ckpt and run.checkpointer.due(run.state.step)
    # every save, export and the checkpoint's commit: train/checkpoint.py (Checkpointer)
    with run.checkpointer.save(run.state) if saving else contextlib.nullcontext() as checkpoint:
        run.checkpointer.export((("latest",) if saving else ()) + (("best",) if improved else ()))
        run.reporter.publish(metrics, due_ray=ray_wants or due.val or due.last, checkpoint=checkpoint)
    if saving:
        run.checkpointer.commit(run.state.step)
    if saving or improved:
        sync_run_dir(run)  # a URI output_dir: logs and exports mirrored beside the checkpoints
    _maybe_fail_for_test(run)


def _maybe_fail_for_test(run: Run) -> None:
    """Test hook ``train.fail_at_step``: rank 0 exits once per run dir at that step."""
    tc = run.cfg.train
    if tc.fail_at_step != run.state.step or run.rank != 0:
        return
    marker = Path(run.plan.run_dir) / FAIL_MARKER
    if marker.exists():
        return
    marker.write_text(f"failed once at step {run.state.step}\n")
    sync_run_dir(run)  # URI storage: the restarted rank 0 fetches the run folder, the marker must be in it
    # Give the controller time to register the reports made so far (it drains them every health check), so
    # the restart point is the last checkpoint reported, not a race.
    time.sleep(2 * Reporter.report_interval_s + 1)
    _log(f"train.fail_at_step={tc.fail_at_step}: rank 0 exits now (test hook; once per run dir)")
    os._exit(17)


# --------------------------------------------------------------------------------------------- entry
def finish(run: Run) -> None:
    """After the last step: the per-rank test export (``train.export_all_ranks``) and closing the logs."""
    run_dir = Path(run.plan.run_dir)
    if run.cfg.train.export_all_ranks:
        # Test/debug hook: every rank writes the state it holds, so tests can check that ranks agree.
        import safetensors.torch

        out = run_dir / "ranks"
        out.mkdir(parents=True, exist_ok=True)
        # contiguous: channels_last conv weights (the default at ZeRO 0) are strided, safetensors refuses them
        sd = {k: v.detach().to("cpu", copy=True).contiguous() for k, v in run.module.state_dict().items()
              if k != "quantizer.counts"}  # fmt: skip
        safetensors.torch.save_file(sd, str(out / f"rank{run.rank}.safetensors"))
    run.reporter.close()
    sync_run_dir(run)
    if run.rank == 0:
        where = run.plan.run_uri or str(run_dir)
        made = [e.replace(str(run_dir), where, 1) for e in run.checkpointer.exports()]
        _log(
            f"done: {run.state.step} steps, best val_mse {run.state.best_val_mse}; exports "
            f"{', '.join(made) or 'none'}"
        )


def _quiet_report_log() -> None:
    """Ray Train logs every ``ray.train.report`` call with all its metrics at INFO; our own progress line says
    the same in one line. Best effort: that logger is internal to Ray (named after its file)."""
    import logging

    try:
        from ray.train.v2._internal.execution import context as train_context

        logging.getLogger(train_context.__file__).setLevel(logging.WARNING)
    except Exception:  # a Ray without that module: keep its logs
        pass


def train_loop_per_worker(config: dict[str, Any]) -> None:
    """Ray Train entry point. ``config = {"cfg": RunConfig dump, "plan": RunPlan}``."""
    _quiet_report_log()
    run = setup(config)
    first_batch_t0 = time.perf_counter()
    while not run.schedule.done(run.state):
        batch = next(run.batches)
        if first_batch_t0 and run.rank == 0:
            _log(f"first batch after {time.perf_counter() - first_batch_t0:.1f}s (Ray Data stream start)")
            first_batch_t0 = 0.0
        train_step(run, batch)
        due = run.schedule.advance(run.state, run.samples_per_step)
        if due.any:
            after_step(run, due)
    finish(run)
