"""The prior's per-worker training loop (runs inside every Ray Train worker), on the tokenizer trainer's
machinery: DeepSpeed's engine (:func:`revq_ray.train.engine.deepspeed_config`), the
:class:`~revq_ray.train.checkpoint.Checkpointer` (``complete.json``, resume from the newest complete
checkpoint in storage, pruning, ``export/latest`` and ``export/best``), the
:class:`~revq_ray.train.schedule.Schedule` and the :class:`~revq_ray.train.logs.Reporter` (``metrics.csv``,
TensorBoard, ``steps.log``, ``ray.train.report``)::

    run = setup(config)
    while not run.schedule.done(run.state):
        train_step(run)                       # a batch, label dropout (CFG), forward, backward, clip, step
        due = run.schedule.advance(run.state, run.samples_per_step)
        if due.any:
            after_step(run, due)              # validate, report, checkpoint, export
    finish(run)

Data. The driver reads the token dataset once (:mod:`revq_ray.prior.data`) and puts its arrays in Ray's object
store; every worker gets them from there. An epoch is a permutation of the training rows drawn from
``(seed, epoch)``; rank r takes every world-th row of it, ``micro`` per step. So the batch of any step is a
function of (seed, epoch, step in epoch, rank): a resumed run continues an interrupted epoch with exactly the
rows the uninterrupted run would have used, and the label dropout of step s is drawn from (seed, s) too.
"""

from __future__ import annotations

import contextlib
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from revq_ray.prior.config import PriorRunConfig
from revq_ray.prior.model import PriorSpec, PriorTransformer
from revq_ray.runtime import get_logger
from revq_ray.train import checkpoint as ckpt
from revq_ray.train import engine as eng
from revq_ray.train.logs import Reporter, _duration
from revq_ray.train.loop import (
    Collectives,
    _accelerator_name,
    _maybe_fail_for_test,
    check_accelerator,
    fetch_run_dir,
    seed_for,
    sync_run_dir,
)
from revq_ray.train.schedule import Schedule

_log = get_logger("revq_ray.prior").info

COLUMNS = [
    "step",
    "epoch",
    "time_s",
    "loss",
    "acc",
    "val_loss",
    "val_acc",
    "val_bits",
    "best_val_loss",
    "samples_per_s",
    "lr",
    "grad_norm",
]


@dataclass
class PriorPlan:
    """What the driver works out once and hands to every worker."""

    spec: dict[str, Any]
    meta: dict[str, Any]
    data: Any  # Ray ObjectRef of {"ids": (N, T) int32, "labels": (N,) int64, "val": (N,) bool, "codebooks"}
    train_count: int
    val_count: int
    micro_batch: int
    steps_per_epoch: int
    total_steps: int
    storage_path: str
    name: str
    run_dir: str
    run_uri: str | None = None


@dataclass
class PriorRun:
    """Everything the loop holds for one worker."""

    cfg: PriorRunConfig
    plan: PriorPlan
    rank: int
    world: int
    device: torch.device
    coll: Collectives
    engine: Any
    state: ckpt.TrainerState
    schedule: Schedule
    reporter: PriorReporter
    checkpointer: ckpt.Checkpointer
    ids: torch.Tensor
    labels: torch.Tensor
    train_rows: torch.Tensor
    val_rows: torch.Tensor
    lr: float = 0.0
    grad_norm: float = math.nan
    last_val: tuple[float, float] | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def module(self) -> PriorTransformer:
        return self.engine.module

    @property
    def samples_per_step(self) -> int:
        return self.plan.micro_batch * self.world


# --------------------------------------------------------------------------------------------- pieces
def lr_at(step: int, total: int, base: float, warmup: int, final_fraction: float) -> float:
    """Linear warm-up over ``warmup`` steps, then cosine decay to ``base * final_fraction`` at ``total``. A
    pure function of the step: a resumed run needs no scheduler state."""
    if warmup and step < warmup:
        return base * (step + 1) / warmup
    span = max(total - warmup, 1)
    frac = min(max(step - warmup, 0) / span, 1.0)
    return base * (final_fraction + (1 - final_fraction) * 0.5 * (1 + math.cos(math.pi * frac)))


def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """AdamW groups: matrices decay; biases, norms, embeddings and the slot embedding do not."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        is_matrix = p.ndim >= 2 and not name.endswith(("emb.weight", "slot_emb"))
        (decay if is_matrix else no_decay).append(p)
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return [g for g in groups if g["params"]]


def deepspeed_config(cfg: PriorRunConfig, world: int) -> dict[str, Any]:
    """The tokenizer trainer's DeepSpeed config (:func:`revq_ray.train.engine.deepspeed_config`: AdamW,
    ZeRO stage, bf16 autocast on GPU), with DeepSpeed's own global gradient clipping (one norm over the
    whole transformer, the usual recipe; the tokenizer clips per module itself)."""
    out = eng.deepspeed_config(cfg.train, world)  # the prior's train section has the same field names
    out["gradient_clipping"] = cfg.train.grad_clip
    return out


def export_prior(module: torch.nn.Module, out_dir: Path) -> Path:
    """Rank 0: ``save_pretrained`` of a fresh CPU copy of the live prior (ZeRO 1/2 flatten the live
    parameters into views), written atomically (:func:`revq_ray.train.checkpoint.write_dir_atomic`)."""
    state = {k: v.detach().to("cpu", copy=True) for k, v in module.state_dict().items()}
    copy_ = PriorTransformer(module.spec, meta=module.meta)
    copy_.load_state_dict(state)
    return ckpt.write_dir_atomic(out_dir, copy_.save_pretrained)


def batch_rows(run: PriorRun, epoch: int, step_in_epoch: int) -> torch.Tensor:
    """This rank's rows for a step: a function of (seed, epoch, step in epoch, rank) only."""
    gen = torch.Generator().manual_seed(seed_for(run.cfg, 11, epoch))
    perm = run.train_rows[torch.randperm(len(run.train_rows), generator=gen)]
    mine = perm[run.rank :: run.world]
    m = run.plan.micro_batch
    return mine[step_in_epoch * m : (step_in_epoch + 1) * m]


class PriorReporter(Reporter):
    """The tokenizer trainer's Reporter with the prior's window (loss, token accuracy) and columns."""

    columns = COLUMNS

    def __init__(self, **kw: Any):
        super().__init__(**kw)
        self.win = torch.zeros(2, dtype=torch.float64, device=kw["device"])

    def add(self, step: int, loss: torch.Tensor, acc: torch.Tensor) -> None:  # type: ignore[override]
        if self.steplog is not None:
            self.steplog.step(step)
        with torch.no_grad():
            self.win += torch.stack([loss.detach().double(), acc.detach().double()])
        self.win_steps += 1

    def close_window(self, step: int) -> tuple[dict[str, float], bool]:
        """Collective: the window's mean loss and accuracy over every rank, and whether Ray wants a report;
        a non-finite loss stops the run naming its steps."""
        from revq_ray.train import guards

        want = float(self.rank == 0 and time.perf_counter() - self.last_report_t >= self.report_interval_s)
        sums = self.reduce_floats([*self.win.tolist(), float(self.win_steps), want])
        n = max(sums[2], 1.0)
        guards.check_window(sums[0], sums[2], step, first_step=step - self.win_steps + 1)
        return {"loss": sums[0] / n, "acc": sums[1] / n}, sums[3] > 0

    def progress_line(self, m: dict[str, Any], eta_s: float | None) -> str:
        parts = [
            f"step {m['step']}/{self.total} ({100 * m['step'] / max(self.total, 1):.0f}%) ep "
            f"{m['epoch']:.2f}",
            f"loss {m['loss']:.4f} acc {100 * m['acc']:.1f}%",
        ]
        if "val_loss" in m:
            parts.append(
                f"val {m['val_loss']:.4f} ({m['val_bits']:.0f} bits/image) acc {100 * m['val_acc']:.1f}%"
            )
        parts.append(f"lr {m.get('lr', math.nan):.1e} | {m['samples_per_s']:,.0f} samples/s")
        if eta_s is not None:
            parts.append(f"eta {_duration(eta_s)}")
        return " | ".join(parts)


# --------------------------------------------------------------------------------------------- setup
def _device(cfg: PriorRunConfig) -> torch.device:
    if not cfg.train.use_gpu:
        return torch.device("cpu")
    import ray.train.torch

    return ray.train.torch.get_device()


def setup(config: dict[str, Any]) -> PriorRun:
    """Build the worker's model, engine, data and logs; restore the newest complete checkpoint if any."""
    import deepspeed
    import ray
    import ray.train

    cfg = PriorRunConfig.model_validate(config["cfg"])
    plan: PriorPlan = config["plan"]
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    torch.set_num_threads(cfg.train.torch_threads)
    device = _device(cfg)
    check_accelerator(device, _accelerator_name())
    coll = Collectives(device)
    checkpointer = ckpt.Checkpointer(
        rank,
        world,
        coll.gather_objects,
        storage=plan.storage_path,
        name=plan.name,
        run_dir=plan.run_dir,
        keep=cfg.train.keep_checkpoints,
        exporter=export_prior,
    )
    # Arrays from the object store are read-only views: each worker takes its own copy (torch.tensor copies).
    data = ray.get(plan.data)
    codebooks = None if data.get("codebooks") is None else torch.tensor(data["codebooks"])
    torch.manual_seed(cfg.seed)  # every rank initializes identically
    model = PriorTransformer(PriorSpec(**plan.spec), codebooks, meta=plan.meta).to(device)
    engine, _, _, _ = deepspeed.initialize(
        model=model,
        model_parameters=param_groups(model, cfg.train.weight_decay),
        config=deepspeed_config(cfg, world),
    )
    state = checkpointer.restore(engine)
    schedule = Schedule(cfg.train, None, plan.steps_per_epoch, plan.total_steps, resets_on=False)  # type: ignore[arg-type]
    if rank == 0 and plan.run_uri:
        fetch_run_dir(plan)  # type: ignore[arg-type]
    Path(plan.run_dir).mkdir(parents=True, exist_ok=True)
    reporter = PriorReporter(
        run_dir=Path(plan.run_dir),
        run_location=plan.run_uri,
        rank=rank,
        samples_per_step=plan.micro_batch * world,
        total_steps=plan.total_steps,
        steps_per_epoch=plan.steps_per_epoch,
        start_step=state.step,
        device=device,
        reduce_floats=coll.sum_floats,
    )
    val = torch.tensor(data["val"])
    run = PriorRun(
        cfg=cfg,
        plan=plan,
        rank=rank,
        world=world,
        device=device,
        coll=coll,
        engine=engine,
        state=state,
        schedule=schedule,
        reporter=reporter,
        checkpointer=checkpointer,
        ids=torch.tensor(data["ids"], dtype=torch.long),
        labels=torch.tensor(data["labels"], dtype=torch.long),
        train_rows=torch.nonzero(~val).flatten(),
        val_rows=torch.nonzero(val).flatten(),
    )
    if rank == 0:
        n = sum(p.numel() for p in model.parameters())
        s = model.spec
        _log(
            f"{world} worker(s), ZeRO {cfg.train.zero_stage}, {eng.resolve_precision(cfg.train)} on "
            f"{device.type}; prior {n:,} parameters (T={s.tokens}, K={s.codebook_size}, {s.num_classes} "
            f"classes, D={s.d_model}, "
            f"{s.layers} layers, embedding {s.embedding}, head {s.head}); {plan.total_steps} steps = "
            f"{plan.total_steps / plan.steps_per_epoch:.2f} epochs of {plan.steps_per_epoch} steps x "
            f"{run.samples_per_step} images; {plan.train_count} train / {plan.val_count} val; run dir "
            f"{plan.run_dir}"
        )
        import json

        (Path(plan.run_dir) / "config.json").write_text(json.dumps(config["cfg"], indent=1))
    return run


# --------------------------------------------------------------------------------------------- step
def train_step(run: PriorRun) -> None:
    """One optimizer step: this rank's rows, label dropout, forward (DeepSpeed's autocast), backward
    (DeepSpeed's all-reduce), clip, step."""
    st, tc = run.state, run.cfg.train
    rows = batch_rows(run, st.epoch, st.step_in_epoch)
    ids = run.ids[rows].to(run.device, non_blocking=True)
    labels = run.labels[rows].to(run.device, non_blocking=True)
    gen = torch.Generator(device=run.device).manual_seed(
        seed_for(run.cfg, 12, st.step * run.world + run.rank)
    )
    labels = run.module.drop_labels(labels, gen)
    run.lr = lr_at(st.step, run.plan.total_steps, tc.lr, tc.warmup_steps, tc.final_lr_fraction)
    for g in run.engine.optimizer.param_groups:
        g["lr"] = run.lr
    logits = run.engine(ids, labels)
    loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), ids.reshape(-1))
    run.engine.backward(loss)
    run.engine.step()
    with torch.no_grad():
        acc = (logits.argmax(-1) == ids).float().mean()
    run.reporter.add(st.step + 1, loss, acc)


@torch.no_grad()
def validate(run: PriorRun) -> tuple[float, float]:
    """Collective: the held-out images' cross-entropy per token (nats) and token accuracy, conditioned on
    their true labels (no dropout), over every worker's share."""
    acc = torch.zeros(3, dtype=torch.float64, device=run.device)  # nll sum, hits, tokens
    module = run.module
    was = module.training
    module.eval()
    try:
        mine = run.val_rows[run.rank :: run.world]
        labels_all = run.labels
        if module.spec.num_classes == 0:
            labels_all = torch.full_like(labels_all, module.spec.null_class)
        for i in range(0, len(mine), run.plan.micro_batch):
            rows = mine[i : i + run.plan.micro_batch]
            ids, labels = run.ids[rows].to(run.device), labels_all[rows].to(run.device)
            with eng.autocast(run.cfg.train, run.device):
                logits = module(ids, labels)
            acc[0] += F.cross_entropy(
                logits.reshape(-1, logits.shape[-1]).float(), ids.reshape(-1), reduction="sum"
            ).double()
            acc[1] += (logits.argmax(-1) == ids).sum().double()
            acc[2] += ids.numel()
    finally:
        module.train(was)
    nll, hits, n = run.coll.sum_(acc).tolist()
    return (nll / n, hits / n) if n else (math.nan, math.nan)


def after_step(run: PriorRun, due: Any) -> None:
    """What a due step asks for: validation, report, checkpoint (and ``export/latest``), ``export/best``."""
    if due.val and len(run.val_rows):
        run.last_val = validate(run)
    if not due.report:
        return
    means, ray_wants = run.reporter.close_window(run.state.step)
    val: dict[str, Any] = {}
    improved = False
    if run.last_val is not None:
        val_loss, val_acc = run.last_val
        val = {
            "val_loss": val_loss,
            "val_acc": val_acc,
            "val_bits": val_loss * run.module.spec.tokens / math.log(2),
        }
        st = run.state
        if due.val and math.isfinite(val_loss) and (st.best_val_loss is None or val_loss < st.best_val_loss):
            st.best_val_loss, improved = val_loss, True
    elif due.last:  # no held-out images: the training loss stands in, flagged
        val = {
            "val_loss": means["loss"],
            "val_acc": means["acc"],
            "val_source": "train",
            "val_bits": means["loss"] * run.module.spec.tokens / math.log(2),
        }
        run.state.best_val_loss, improved = means["loss"], True
    if run.state.best_val_loss is not None:
        val["best_val_loss"] = run.state.best_val_loss
    grad_norm = run.engine.get_global_grad_norm()
    metrics = run.reporter.metrics(
        run.state, means, lr=run.lr, grad_norm=None if grad_norm is None else float(grad_norm), **val
    )
    saving = due.ckpt and run.checkpointer.due(run.state.step)
    with run.checkpointer.save(run.state) if saving else contextlib.nullcontext() as checkpoint:
        run.checkpointer.export((("latest",) if saving else ()) + (("best",) if improved else ()))
        run.reporter.publish(metrics, due_ray=ray_wants or due.val or due.last, checkpoint=checkpoint)
    if saving:
        run.checkpointer.commit(run.state.step)
    if saving or improved:
        sync_run_dir(run)  # type: ignore[arg-type]
    _maybe_fail_for_test(run)  # type: ignore[arg-type]


def finish(run: PriorRun) -> None:
    run.reporter.close()
    sync_run_dir(run)  # type: ignore[arg-type]
    if run.rank == 0:
        _log(
            f"done: {run.state.step} steps, best val_loss {run.state.best_val_loss}; exports "
            f"{', '.join(run.checkpointer.exports()) or 'none'}"
        )


def train_loop_per_worker(config: dict[str, Any]) -> None:
    """Ray Train entry point. ``config = {"cfg": PriorRunConfig dump, "plan": PriorPlan}``."""
    from revq_ray.train.loop import _quiet_report_log

    _quiet_report_log()
    run = setup(config)
    while not run.schedule.done(run.state):
        train_step(run)
        due = run.schedule.advance(run.state, run.samples_per_step)
        if due.any:
            after_step(run, due)
    finish(run)
