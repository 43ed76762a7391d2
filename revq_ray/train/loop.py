"""The per-worker training loop (runs inside every Ray Train worker).

Reads like nanoGPT's: build the model, resume or initialize, then for each batch: step, maybe reset, maybe
validate, maybe report / checkpoint. Everything Ray-specific stays in this package; the model is core's
``ReVQModel`` under a DeepSpeed engine (:mod:`revq_ray.train.engine`).

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
"""

from __future__ import annotations

import json
import math
import os
import shutil
import socket
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from revq_ray.config import RunConfig
from revq_ray.train import checkpoint as ckpt
from revq_ray.train import engine as eng
from revq_ray.train import guards
from revq_ray.train.logs import RunLogger, StepLog, progress_line

FAIL_MARKER = ".fail_at_step.done"
# Ray Train V2 takes one report per worker every health-check interval (a queue of size 1, drained every
# RAY_TRAIN_HEALTH_CHECK_INTERVAL_S = 2 s by default): reporting more often blocks the training loop. So every
# log step goes to the CSV, TensorBoard and the progress line, but to ray.train.report only if this long has
# passed since the last report; checkpoints, validations and the final step are always reported.
_REPORT_INTERVAL_S = float(os.environ.get("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "2.0"))


def _log(msg: str) -> None:
    print(f"[revq_ray.train] {msg}", flush=True)


class _Dist:
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


def _endless_batches(shard: Any, micro: int, cfg: RunConfig, has_logvar: bool) -> Iterator[dict[str, Any]]:
    """Batches of ``micro`` latents from this worker's split, pass after pass."""
    passes = 0
    while True:
        got = 0
        for batch in shard.iter_torch_batches(
            batch_size=micro,
            dtypes=torch.float32,
            drop_last=True,
            local_shuffle_buffer_size=cfg.data.shuffle_buffer or None,
            prefetch_batches=cfg.data.prefetch_batches,
        ):
            got += 1
            yield batch
        passes += 1
        if got == 0:
            raise RuntimeError(
                f"this worker's split of the training data holds fewer than one batch of {micro} latents: "
                "lower "
                "train.batch_size or train.num_workers, or add data"
            )


def _seed_for(cfg: RunConfig, what: int, index: int) -> int:
    # Distinct, reproducible streams: the same on every rank and after every restart.
    return (cfg.seed * 1_000_003 + what * 7_919 + index) % (2**63 - 1)


@torch.no_grad()
def _validate(
    module: Any, val_shard: Any, micro: int, dist: _Dist, autocast: Any
) -> tuple[float, float, int]:
    """Latent MSE in standardized units with and without the rectifier, over every worker's val split."""
    se = torch.zeros((), dtype=torch.float64)
    se_norect = torch.zeros((), dtype=torch.float64)
    n = 0
    was = module.training
    module.eval()  # the quantizer does not count eval hits
    try:
        for batch in val_shard.iter_torch_batches(batch_size=micro, dtypes=torch.float32, drop_last=False):
            latents = batch["latent"].to(dist.device)
            logvar = batch["logvar"].to(dist.device) if "logvar" in batch else None
            with autocast():
                out = module(latents, logvar)
            target = out.latents_std.float()
            se += (out.rectified_std.float() - target).pow(2).sum().double().cpu()
            se_norect += (out.quantized.float() - target).pow(2).sum().double().cpu()
            n += target.numel()
    finally:
        module.train(was)
    tot = dist.sum_floats([float(se), float(se_norect), float(n)])
    if tot[2] == 0:
        return float("nan"), float("nan"), 0
    return tot[0] / tot[2], tot[1] / tot[2], int(tot[2])


def _init_codebook(model: Any, cfg: RunConfig, plan: dict[str, Any]) -> None:
    """Fill the codebooks from tokens sampled from the training split (rank 0; DeepSpeed then broadcasts
    rank 0's parameters to every rank at initialize)."""
    from revq_ray.data.reader import sample_init_tokens, train_val_datasets
    from revq_ray.train.driver import quiet_data_progress

    quiet_data_progress()
    n = cfg.data.init_samples or cfg.model.quantizer.codebook_size
    t0 = time.time()
    # keys=True: the sampler hashes keys, so the sample does not depend on block arrival order.
    init_ds, _ = train_val_datasets(cfg.data, cfg.seed, keys=True)
    tokens_ntd = sample_init_tokens(init_ds, model.layout.tokens, n, seed=cfg.seed)
    z = model.layout.to_latent(tokens_ntd)
    z_std = model.standardizer(z.to(model.standardizer.mean.dtype))
    gen = torch.Generator().manual_seed(_seed_for(cfg, 1, 0))
    model.quantizer.init_from_tokens(model.layout.to_tokens(z_std), generator=gen)
    _log(
        f"codebook init ({cfg.model.quantizer.init}) from {tokens_ntd.shape[0]} sampled tokens per group in "
        f"{time.time() - t0:.1f}s"
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
    """Ray Train entry point. ``config = {"cfg": RunConfig dump, "plan": driver-computed facts}``."""
    import ray.train
    from ray.train import Checkpoint

    from revq_ray.core.model import ReVQModel
    from revq_ray.core.stats import RunningStats

    _quiet_report_log()
    cfg = RunConfig.model_validate(config["cfg"])
    plan: dict[str, Any] = config["plan"]
    tc = cfg.train
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    torch.set_num_threads(tc.torch_threads)
    if tc.use_gpu:
        import ray.train.torch

        device = ray.train.torch.get_device()
    else:
        device = torch.device("cpu")
    dist = _Dist(device)
    run_dir = Path(plan["run_dir"])
    micro = plan["micro_batch"]
    spe, total = plan["steps_per_epoch"], plan["total_steps"]
    bf16 = eng.resolve_precision(tc) == "bf16"

    def autocast():
        return torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=bf16)

    # ------------------------------------------------------------------ build
    torch.manual_seed(cfg.seed)
    model = ReVQModel.from_config(plan["latent_shape"], cfg.model)
    model.standardizer.set_stats(RunningStats.from_state_dict(plan["stats"]))
    model.set_reduce_fn(dist.sum_)
    model.to(device)
    t_build = time.perf_counter()
    restored = ray.train.get_checkpoint()
    if restored is None and rank == 0:
        _init_codebook(model, cfg, plan)
    t_ds = time.perf_counter()
    engine, group_names = eng.build_engine(model, tc, world)
    module = engine.module
    if rank == 0:
        _log(
            f"DeepSpeed engine ready in {time.perf_counter() - t_ds:.1f}s "
            f"(worker setup {time.perf_counter() - t_build:.1f}s)"
        )

    # ------------------------------------------------------------------ resume
    state = ckpt.TrainerState(world_size=world)
    if restored is not None:
        with restored.as_directory() as d:
            state = ckpt.load(engine, d, rank, world)
        if rank == 0:
            _log(
                f"resumed from {restored.path}: step {state.step}, epoch {state.epoch} "
                f"(+{state.step_in_epoch} steps)"
            )
    start_step = state.step
    workers = dist.gather_objects(
        {
            "rank": rank,
            "node_id": ray.get_runtime_context().get_node_id(),
            "host": socket.gethostname(),
            "pid": os.getpid(),
        }
    )
    logger = steplog = None
    if rank == 0:
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "workers.json").write_text(json.dumps(workers, indent=1))
        (run_dir / "config.json").write_text(json.dumps(config["cfg"], indent=1))
        logger = RunLogger(run_dir, start_step)
        steplog = StepLog(run_dir, start_step)
        n_params = {k: sum(p.numel() for p in v) for k, v in model.param_groups().items()}
        _log(
            f"{world} worker(s), ZeRO {tc.zero_stage}, {'bf16 autocast' if bf16 else 'fp32'} on "
            f"{device.type}; "
            f"params codebook {n_params['codebook']:,} rectifier {n_params['rectifier']:,}; "
            f"{total} steps = {total / spe:.2f} epochs of {spe} steps x {micro * world} latents; "
            f"run dir {run_dir}"
        )

    train_shard = ray.train.get_dataset_shard("train")
    val_shard = ray.train.get_dataset_shard("val") if plan.get("has_val") else None
    stream = _endless_batches(train_shard, micro, cfg, plan["has_logvar"])

    reset_cfg = cfg.model.quantizer.reset
    resets_on = reset_cfg.enabled  # type=vq forces it off; methods without a reset return None
    val_every, ckpt_every = tc.val_every, tc.checkpoint_every
    # Window sums stay on the device (loss, quant, rect): no host sync per step.
    win = torch.zeros(3, dtype=torch.float64, device=device)
    win_steps = 0
    win_t0 = time.perf_counter()
    run_t0 = time.perf_counter()
    first_batch_logged = False
    extra_losses: dict[str, torch.Tensor] = {}
    last_norms: dict[str, float] = {}
    last_val: tuple[float, float] | None = None
    last_ckpt_step = start_step
    reset_codes_since_report = 0
    last_report_t = 0.0
    lr = 0.0

    # ------------------------------------------------------------------ train
    while state.step < total:
        batch = next(stream)
        if not first_batch_logged and rank == 0:
            first_batch_logged = True
            _log(f"first batch after {time.perf_counter() - run_t0:.1f}s (Ray Data stream start)")
        latents = batch["latent"].to(device, non_blocking=True)
        logvar = batch["logvar"].to(device, non_blocking=True) if "logvar" in batch else None
        lr = eng.set_lr(engine.optimizer, state.step, total, tc.final_lr_fraction)
        out = engine(latents, logvar)
        loss = out.loss
        engine.backward(loss)
        last_norms = eng.clip_grad_norms_(engine, group_names, tc.grad_clip)
        engine.step()

        state.step += 1
        state.step_in_epoch += 1
        if steplog is not None:
            steplog.step(state.step)
        state.samples += micro * world
        with torch.no_grad():
            rect = out.losses["rect"].detach().double()
            win += torch.stack([loss.detach().double(), loss.detach().double() - rect, rect])
            for k, v in out.losses.items():
                if k not in ("quant", "rect"):
                    extra_losses[k] = extra_losses.get(k, 0.0) + v.detach().double()
        win_steps += 1

        epoch_end = state.step_in_epoch >= spe
        if epoch_end:
            state.epoch += 1
            state.step_in_epoch = 0
        last = state.step >= total
        due_log = state.step % tc.log_every == 0
        due_val = (state.step % val_every == 0) if val_every else epoch_end
        due_ckpt = (state.step % ckpt_every == 0) if ckpt_every else epoch_end
        due_val, due_ckpt = due_val or last, due_ckpt or last
        if resets_on:
            due_reset = (
                (state.step % reset_cfg.interval == 0)
                if reset_cfg.unit == "steps"
                else (epoch_end and state.epoch % reset_cfg.interval == 0)
            )
            due_reset = due_reset and not last  # a reset after the last step would only throw counts away
        else:
            due_reset = False
        if not (due_log or due_val or due_ckpt or due_reset):
            continue

        # -------------------------------------------------------------- metrics (collective)
        # Usage since the last reset, read *before* this step's reset zeroes the counts.
        usage = module.quantizer.usage_stats(reduce=True)
        if due_reset:
            gen = torch.Generator().manual_seed(_seed_for(cfg, 2, state.step))
            report = module.quantizer.maybe_reset(gen)
            if report is not None:
                eng.apply_reset_to_optimizer(engine, report)
                reset_codes_since_report += report.count
                state.resets += 1
        if due_val and val_shard is not None:
            vm, vn, _ = _validate(module, val_shard, micro, dist, autocast)
            last_val = (vm, vn)
        if not (due_log or due_val or due_ckpt):
            continue
        # Rank 0's clock decides whether this log step also goes to Ray (see _REPORT_INTERVAL_S); riding on
        # the metrics all-reduce keeps every rank's report count equal, as ray.train.report requires.
        want = float(rank == 0 and time.perf_counter() - last_report_t >= _REPORT_INTERVAL_S)
        sums = dist.sum_floats([*win.tolist(), float(win_steps), want])
        # Before any checkpoint/export: a non-finite window stops the run here (every rank alike).
        guards.check_window(
            sums[0], sums[3], state.step, first_step=state.step - win_steps + 1,
            module=module if due_ckpt or due_val else None,
        )  # fmt: skip
        steps_all = max(sums[3], 1.0)
        elapsed = time.perf_counter() - win_t0
        groups = engine.optimizer.param_groups
        metrics: dict[str, Any] = {
            "step": state.step,
            "epoch": state.epoch + state.step_in_epoch / spe,
            "time_s": round(time.perf_counter() - run_t0, 3),
            "loss": sums[0] / steps_all,
            "loss_quant": sums[1] / steps_all,
            "loss_rect": sums[2] / steps_all,
            "samples_per_s": win_steps * micro * world / max(elapsed, 1e-9),
            "lr": lr,
            "run_dir": str(run_dir),
        }
        if len(groups) > 1:
            metrics["lr_rectifier"] = groups[1]["lr"]
        for name, norm in last_norms.items():
            metrics[f"grad_norm_{name}"] = norm
        for k, v in extra_losses.items():
            metrics[f"loss_{k}"] = float(v) / max(win_steps, 1)
        if usage:
            metrics.update(
                usage_mean=float(usage["usage"].float().mean()),
                usage_min=float(usage["usage"].float().min()),
                perplexity=float(usage["perplexity"].float().mean()),
                dead_codes=int(usage["dead"].sum()),
            )
        metrics["reset_codes"] = reset_codes_since_report
        if last_val is not None:
            metrics["val_mse"], metrics["val_mse_norect"] = last_val
        elif last:
            # No validation data (data.val_items=0 and no data.val_shards): fall back to the training loss so
            # that a Tune objective still exists; flagged so nobody mistakes it for held-out error.
            metrics["val_mse"], metrics["val_mse_norect"] = metrics["loss_rect"], float("nan")
            metrics["val_source"] = "train"
        improved = False
        val_now = metrics.get("val_mse", math.nan) if due_val else math.nan
        if math.isfinite(val_now) and (state.best_val_mse is None or val_now < state.best_val_mse):
            state.best_val_mse = val_now
            improved = True
        if state.best_val_mse is not None:
            metrics["best_val_mse"] = state.best_val_mse

        checkpoint = None
        tmp = None
        if due_ckpt and state.step > last_ckpt_step:
            tmp = tempfile.mkdtemp(prefix=f"revq_ckpt_r{rank}_")
            ckpt.save(engine, state, tmp, rank, world)
            checkpoint = Checkpoint.from_directory(tmp)
            last_ckpt_step = state.step
        if rank == 0:
            assert logger is not None
            if checkpoint is not None:
                ckpt.export_pretrained(module, run_dir / "export" / "latest")
            if improved:
                ckpt.export_pretrained(module, run_dir / "export" / "best")
            logger.log(metrics)
            rate = state.step - start_step
            eta = (total - state.step) * (time.perf_counter() - run_t0) / rate if rate else None
            _log(progress_line(metrics, total, eta))
        if checkpoint is not None or due_val or last or sums[4] > 0:
            ray.train.report(
                metrics,
                checkpoint=checkpoint,
                checkpoint_dir_name=f"checkpoint_step{state.step:09d}" if checkpoint else None,
            )
            last_report_t = time.perf_counter()
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
        win.zero_()
        win_steps = 0
        extra_losses = {}
        reset_codes_since_report = 0
        win_t0 = time.perf_counter()

        # -------------------------------------------------------------- test hook
        if tc.fail_at_step == state.step and rank == 0:
            marker = run_dir / FAIL_MARKER
            if not marker.exists():
                marker.write_text(f"failed once at step {state.step}\n")
                # Give the controller time to register the reports made so far (it drains them every health
                # check), so the restart point is the last checkpoint reported, not a race.
                time.sleep(2 * _REPORT_INTERVAL_S + 1)
                _log(f"train.fail_at_step={tc.fail_at_step}: rank 0 exits now (test hook; once per run dir)")
                os._exit(17)

    # ------------------------------------------------------------------ end
    if tc.export_all_ranks:
        # Test/debug hook: every rank writes the state it holds, so tests can check that ranks agree.
        import safetensors.torch

        out = run_dir / "ranks"
        out.mkdir(parents=True, exist_ok=True)
        sd = {
            k: v.detach().to("cpu", copy=True)
            for k, v in module.state_dict().items()
            if k != "quantizer.counts"
        }
        safetensors.torch.save_file(sd, str(out / f"rank{rank}.safetensors"))
    if logger is not None:
        logger.close()
        steplog.close()  # type: ignore[union-attr]
        _log(f"done: {state.step} steps, best val_mse {state.best_val_mse}; exports in {run_dir / 'export'}")
