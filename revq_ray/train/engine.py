"""DeepSpeed engine over a ReVQModel: config, param groups, lr schedule, per-module clipping, reset plumbing.

The reference recipe, made ZeRO-aware:

- AdamW with two param groups: ``codebook`` (lr, no weight decay) and ``rectifier`` (lr * 0.05, weight decay
  1e-4); empty groups are dropped (GQ has no trainable codebook, the identity rectifier no parameters).
  Under ``train.codebook_update`` rows / rows_lazy (rows_lazy is the default for revq/vq) the codebook is not
  DeepSpeed's: it travels as the rows a step touched and has its own optimizer
  (:mod:`revq_ray.train.codebook`); :func:`backward`, :func:`clip`, :func:`step` and :func:`set_lrs` drive
  both. At ZeRO 0 DeepSpeed's backward all-reduce is then switched off (it would all-reduce every module
  parameter, the codebook as zeros included) and :func:`backward` has DeepSpeed all-reduce the rectifier's
  gradients alone; at ZeRO 1/2 DeepSpeed reduces only the parameters it optimizes, the rectifier's.
- Exponential lr decay from lr to ``lr * final_lr_fraction`` over the planned steps. The lr is a pure function
  of the step (:func:`lr_factor`), so a resumed run needs no scheduler state.
- Gradient-norm clipping to ``grad_clip`` *per group* (codebook and rectifier separately), done here rather
  than by DeepSpeed, whose ``gradient_clipping`` only knows one global norm. Where the gradients live depends
  on the ZeRO stage:

  * stage 0: every rank holds the full, already averaged ``param.grad``: clip it in place.
  * stages 1 and 2: DeepSpeed drops ``param.grad`` and keeps each rank's *partition* of the averaged gradient
    in flat fp32 buffers; every parameter fragment is reachable through ``param._hp_mapping``. Each rank sums
    the squares of its own fragments, one all-reduce of a (groups,) vector gives the exact global norms, and
    each rank scales its fragments in place. Same result as stage 0 (tested), one tiny all-reduce extra.
  * stage 3 (partitioned parameters): not supported by this trainer (codebooks are gathered by rows in the
    nearest-code search, which would need every partition); :func:`deepspeed_config` refuses it.

- Precision ``bf16`` means ``torch.autocast`` (DeepSpeed's ``torch_autocast``, which wraps the whole
  forward): parameters, gradients, their all-reduce and the optimizer state stay fp32; the rectifier's
  matmuls and convs run in bf16. The quantizer switches autocast off around the nearest-code search, the
  code gather, its losses and the codebook update (:mod:`revq_ray.core.precision`), so the trainer picks
  exactly the codes the fp32 Tokenizer picks (tested under CPU bf16 autocast).

Reset plumbing: a non-activation reset overwrites codebook rows in the module's parameter on every rank
(identical values). Under ZeRO 1/2 the optimizer holds its own fp32 master copy of each rank's partition and
would overwrite the module parameter at the next step, so :func:`apply_reset_to_optimizer` writes the reset
rows into the local master fragment too, and zeroes their Adam moments (``exp_avg``, ``exp_avg_sq``) at
every stage, so a reset code starts fresh instead of inheriting the momentum of the dead one.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

import torch

from revq_ray.config import TrainConfig

if TYPE_CHECKING:  # pragma: no cover
    from revq_ray.core.model import ReVQModel
    from revq_ray.core.quantizers import ResetReport

GROUP_NAMES = ("codebook", "rectifier")
ADAM_MOMENTS = ("exp_avg", "exp_avg_sq")


# --------------------------------------------------------------------------------------------- config
def resolve_precision(train: TrainConfig) -> str:
    """``auto`` -> ``bf16`` on GPU, ``fp32`` on CPU."""
    if train.precision == "auto":
        return "bf16" if train.use_gpu else "fp32"
    return train.precision


def autocast(train: TrainConfig, device: torch.device) -> Any:
    """The autocast context of the training forward (bf16 when ``train.precision`` resolves to it), for
    passes that call the module directly (validation) instead of through the engine."""
    return torch.autocast(
        device_type=device.type if device.type in ("cpu", "cuda") else "cpu",
        dtype=torch.bfloat16,
        enabled=resolve_precision(train) == "bf16",
    )


def per_worker_batch(train: TrainConfig) -> int:
    """The micro batch of one worker: ``train.batch_size`` is global and must split evenly."""
    if train.batch_size % train.num_workers:
        raise ValueError(
            f"train.batch_size={train.batch_size} is the global batch and must be divisible by "
            f"train.num_workers={train.num_workers} (e.g. train.batch_size="
            f"{max(1, train.batch_size // train.num_workers) * train.num_workers})"
        )
    return train.batch_size // train.num_workers


def check_fast_paths(train: TrainConfig) -> None:
    """Refuse fast-path options the DeepSpeed trainer cannot honour, before any worker starts."""
    if train.channels_last is True and train.zero_stage != 0:
        raise ValueError(
            f"train.channels_last=true needs train.zero_stage=0 (got {train.zero_stage}): ZeRO 1/2 flatten "
            "parameters into contiguous buffers; set one of them back"
        )


def channels_last(train: TrainConfig) -> bool:
    """Whether the rectifier's convs run channels_last: as set, or (None = auto) at ZeRO stage 0."""
    return train.zero_stage == 0 if train.channels_last is None else train.channels_last


def deepspeed_config(train: TrainConfig, world_size: int) -> dict[str, Any]:
    """The DeepSpeed config dict for ``train`` on ``world_size`` ranks."""
    if train.zero_stage > 2:
        raise ValueError(
            f"train.zero_stage={train.zero_stage}: stage 3 partitions parameters, which the grouped "
            "nearest-code search cannot use; choose 0, 1 or 2 (2 already partitions optimizer state and "
            "gradients)"
        )
    micro = train.batch_size // world_size
    cfg: dict[str, Any] = {
        "train_batch_size": micro * world_size,
        "train_micro_batch_size_per_gpu": micro,
        "gradient_accumulation_steps": 1,
        # torch's AdamW everywhere: no JIT-compiled fused op (CPU has none; on GPU no CUDA toolchain needed),
        # and its per-parameter state is what the reset code clears at stage 0.
        "optimizer": {
            "type": "AdamW",
            "params": {
                "lr": train.lr,
                "betas": [0.9, 0.999],
                "eps": 1e-8,
                "weight_decay": 0.0,
                "torch_adam": True,
                # DeepSpeed hands the remaining params to torch.optim.AdamW: its fused kernel (CPU and CUDA)
                # gives the same update to rounding in far fewer passes over the codebook.
                **({"fused": True} if train.fused_optimizer else {}),
            },
        },
        # Clipping is per module and done by clip_grad_norms_ (DeepSpeed's is one global norm).
        "gradient_clipping": 0.0,
        "zero_optimization": {"stage": train.zero_stage},
        "steps_per_print": 10**9,  # our own progress line instead
        "wall_clock_breakdown": False,
    }
    if train.zero_stage in (1, 2):
        # Plain, non-overlapped reduction: deterministic and works with gloo (CPU) and NCCL alike.
        cfg["zero_optimization"].update(
            {
                "overlap_comm": False,
                "contiguous_gradients": True,
                "reduce_scatter": True,
                "allgather_partitions": True,
            }
        )
    if resolve_precision(train) == "bf16":
        # No module is "lower-precision safe": DeepSpeed would otherwise tag every Linear/Conv parameter with
        # comm_dtype=bf16 and all-reduce those gradients in bf16. Gradients stay fp32 end to end; autocast
        # only changes the rectifier's matmuls (the quantizer turns it off, revq_ray/core/precision.py).
        cfg["torch_autocast"] = {"enabled": True, "dtype": "bfloat16", "lower_precision_safe_modules": []}
    return cfg


def param_groups(model: ReVQModel, train: TrainConfig, codebook: bool = True) -> list[dict[str, Any]]:
    """AdamW param groups of the reference recipe; each carries ``name`` and ``base_lr`` for the schedule.
    ``codebook=False`` leaves the codebook out (``train.codebook_update`` rows*: it has its own optimizer)."""
    groups = model.param_groups()
    spec = {
        "codebook": (train.lr, 0.0),
        "rectifier": (train.lr * train.rectifier_lr_scale, train.rectifier_weight_decay),
    }
    out = []
    for name in GROUP_NAMES if codebook else GROUP_NAMES[1:]:
        params = groups.get(name, [])
        if not params:
            continue
        lr, wd = spec[name]
        out.append({"params": params, "lr": lr, "base_lr": lr, "weight_decay": wd, "name": name})
    unknown = set(groups) - set(GROUP_NAMES)
    if unknown:
        raise RuntimeError(f"ReVQModel.param_groups returned unknown groups {sorted(unknown)}")
    if not out:
        raise ValueError(
            "the model has no trainable parameters (e.g. model.quantizer.type=gq with "
            "model.rectifier.type=identity): nothing to train"
        )
    return out


def lr_factor(step: int, total_steps: int, final_fraction: float) -> float:
    """Exponential decay: 1 at step 0, ``final_fraction`` at ``total_steps``."""
    return final_fraction ** (min(step, total_steps) / max(total_steps, 1))


def set_lr(optimizer: Any, step: int, total_steps: int, final_fraction: float) -> float:
    """Set every group's lr for the step about to run; returns the codebook (first group's) lr."""
    f = lr_factor(step, total_steps, final_fraction)
    for g in optimizer.param_groups:
        g["lr"] = g.get("base_lr", g["lr"]) * f
    return optimizer.param_groups[0]["lr"]


def build_engine(model: ReVQModel, train: TrainConfig, world_size: int) -> tuple[Any, list[str], Any]:
    """``deepspeed.initialize`` over ``model``; returns ``(engine, group_names, codebook)``: the names of
    DeepSpeed's optimizer groups in order, and the codebook's own exchange + optimizer
    (:class:`revq_ray.train.codebook.CodebookRows`) when ``train.codebook_update`` resolves to ``rows`` or
    ``rows_lazy`` (DeepSpeed then trains the rectifier only), else None.

    Reuses the process group Ray Train created (gloo on CPU, NCCL on GPU)."""
    import deepspeed

    from revq_ray.train.codebook import CodebookRows, resolve_codebook_update

    check_fast_paths(train)
    mode = resolve_codebook_update(train, model)
    rows = None
    if mode != "dense":
        rows = CodebookRows(model, train, mode, world_size)
    groups = param_groups(model, train, codebook=rows is None)
    names = [g.pop("name") for g in groups]
    base = [g.pop("base_lr") for g in groups]
    engine, optimizer, _, _ = deepspeed.initialize(
        model=model, model_parameters=groups, config=deepspeed_config(train, world_size)
    )
    # DeepSpeed rebuilds the group dicts; remember the base lr on the live ones for the schedule.
    for g, lr in zip(optimizer.param_groups, base):
        g["base_lr"] = lr
    if rows is not None and train.zero_stage == 0:
        # At stage 0 DeepSpeed's backward all-reduces every module parameter's gradient (a missing one as
        # zeros): the whole codebook again. The rectifier's all-reduce is done by backward() below instead.
        engine.enable_backward_allreduce = False
    if channels_last(train):
        # After initialize: DeepSpeed's initial broadcast views parameters as bytes and needs the default
        # layout. Module.to swaps each conv weight's data in place (same Parameter objects, so the optimizer
        # still holds them; its state is created at the first step); values are unchanged.
        model.rectifier.to(memory_format=torch.channels_last)
    return engine, names, rows


def backward(engine: Any, loss: torch.Tensor, rows: Any = None) -> None:
    """``engine.backward`` plus, with a row-exchanged codebook, the rectifier's all-reduce at ZeRO 0 (by
    DeepSpeed, over the rectifier's gradients only) and the codebook's row exchange. Collective."""
    engine.backward(loss)
    if rows is None:
        return
    if not engine.enable_backward_allreduce:
        grads = []
        for p in (q for g in _group_params(engine) for q in g):
            if p.grad is None:  # as DeepSpeed does: every rank reduces the same buffers
                p.grad = torch.zeros_like(p)
            grads.append(p.grad.data)
        if rows.world > 1:
            engine.buffered_allreduce_fallback(grads=grads)
    rows.exchange()


def clip(engine: Any, names: list[str], rows: Any, max_norm: float) -> dict[str, torch.Tensor]:
    """Per-module clip of every group (DeepSpeed's and, if any, the row-exchanged codebook); pre-clip norms.
    The codebook's norm is the norm of its averaged gradient in both paths (untouched rows add zeros)."""
    norms = clip_grad_norms_(engine, names, max_norm)
    if rows is not None:
        norms = {"codebook": rows.clip(max_norm), **norms}
    return norms


def step(engine: Any, rows: Any = None) -> None:
    """The optimizer step of every group. The codebook's first: DeepSpeed's step clears every module
    parameter's gradient at ZeRO 0, the codebook's included."""
    if rows is not None:
        rows.step()
    engine.step()


def set_lrs(
    engine: Any, names: list[str], rows: Any, step: int, total_steps: int, final_fraction: float
) -> dict[str, float]:
    """Set the lr of every group (DeepSpeed's and the codebook's own) for the step about to run; returns
    the lr by group name (``codebook``, ``rectifier``; absent groups left out)."""
    f = lr_factor(step, total_steps, final_fraction)
    for g in engine.optimizer.param_groups:
        g["lr"] = g.get("base_lr", g["lr"]) * f
    out = {n: float(g["lr"]) for n, g in zip(names, engine.optimizer.param_groups)}
    if rows is not None:
        rows.set_lr(f)
        out["codebook"] = rows.lr
    return out


# --------------------------------------------------------------------------------------------- fragments
def _fragment(p: torch.nn.Parameter) -> Any | None:
    """DeepSpeed's mapping of ``p`` to this rank's slice of the fp32 partition (ZeRO 1/2), else None."""
    return getattr(p, "_hp_mapping", None)


def _is_partitioned(p: torch.nn.Parameter) -> bool:
    return hasattr(p, "_hp_mapping")


def _grad_fragment(p: torch.nn.Parameter) -> torch.Tensor | None:
    """This rank's piece of ``p``'s averaged gradient: the full ``p.grad`` at stage 0, a flat slice at 1/2."""
    if p.grad is not None:
        return p.grad
    hp = _fragment(p)
    if hp is None:
        return None
    return hp.get_lp_grad_fragment(p._index_in_param_group)


def _group_params(engine: Any) -> list[list[torch.nn.Parameter]]:
    """The module parameters of every optimizer group. At ZeRO 1/2 the optimizer's own groups hold flat fp32
    partitions; DeepSpeed keeps the module parameters per group in ``bit16_groups`` (fp32 ones too)."""
    lp = getattr(engine.optimizer, "bit16_groups", None)
    if lp is not None:
        return [list(g) for g in lp]
    return [list(g["params"]) for g in engine.optimizer.param_groups]


@torch.no_grad()
def clip_grad_norms_(engine: Any, names: list[str], max_norm: float) -> dict[str, torch.Tensor]:
    """Clip each param group's gradient norm to ``max_norm`` in place (0 = measure only).

    Call after ``engine.backward`` and before ``engine.step``. Returns the pre-clip norm of every group as a
    0-dim tensor on the device: nothing here waits for the device (call ``float()`` only when logging), and
    no fp64 copy of a gradient is made (``torch._foreach_norm`` reads each fragment once, in its own dtype,
    the same arithmetic as :func:`revq_ray.core.optim.clip_grad_norms_` and ``clip_grad_norm_``).
    Collective at ZeRO 1/2 (one all-reduce of a (groups,) vector): every rank must call it.
    """
    import torch.distributed as dist

    groups = _group_params(engine)
    partitioned = any(_is_partitioned(p) for g in groups for p in g)
    dev = next(iter(engine.module.parameters())).device
    frags = [[f for f in (_grad_fragment(p) for p in g) if f is not None] for g in groups]
    zero = torch.zeros((), dtype=torch.float32, device=dev)
    # Squared norm of each group: sum of the squared per-fragment norms (fragments are disjoint).
    sq = torch.stack(
        [torch.stack(torch._foreach_norm(fl)).float().square().sum() if fl else zero for fl in frags]
    )
    if partitioned and dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        # Each rank holds disjoint slices of the averaged gradient: the squared sums add up exactly.
        dist.all_reduce(sq, op=dist.ReduceOp.SUM)
    norms = sq.sqrt()
    if max_norm > 0:
        coef = torch.clamp(max_norm / (norms + 1e-6), max=1.0)
        for i, fl in enumerate(frags):
            if fl:
                torch._foreach_mul_(fl, coef[i].to(fl[0].dtype))
    return {names[i]: norms[i] for i in range(len(groups))}


def _row_flat_index(param: torch.Tensor, groups: torch.Tensor, codes: torch.Tensor) -> torch.Tensor:
    """Flat element indices (n, row) of codebook rows ``(groups[i], codes[i])`` in a contiguous parameter of
    shape (G, K, *row) (or (K, *row) for a shared codebook, where ``groups`` is ignored)."""
    shape = tuple(param.shape)
    if len(shape) >= 3:
        row = math.prod(shape[2:])
        base = (groups.long() * shape[1] + codes.long()) * row
    elif len(shape) == 2:
        row = shape[1]
        base = codes.long() * row
    else:
        raise ValueError(f"reset rows of a parameter of shape {shape}: expected (G, K, d) or (K, d)")
    return base[:, None] + torch.arange(row, dtype=torch.long)[None, :]


def _base_optimizer(engine: Any) -> Any:
    """The torch optimizer under any DeepSpeed wrapper."""
    opt = engine.optimizer
    return getattr(opt, "optimizer", opt)


def _flat_partition_state(engine: Any, hp: Any) -> dict[str, torch.Tensor]:
    """Adam state tensors of the flat fp32 partition that ``hp`` (a fragment mapping) lives in."""
    opt = engine.optimizer
    flats = getattr(opt, "single_partition_of_fp32_groups", None) or getattr(
        opt, "fp32_groups_flat_partition", None
    )
    if flats is None:
        return {}
    flat = flats[hp.param_group_index]
    return _base_optimizer(engine).state.get(flat, {})


@torch.no_grad()
def apply_reset_to_optimizer(engine: Any, report: ResetReport, rows: Any = None) -> int:
    """Propagate a reset (rows already overwritten in the module parameter) into the optimizer.

    Writes the new rows into this rank's fp32 master fragment (ZeRO 1/2) and zeroes their Adam moments.
    Purely local (no communication): every rank applies the identical reset to its own slice. Returns the
    number of elements whose moments were cleared on this rank. With a row-exchanged codebook (``rows``,
    :class:`revq_ray.train.codebook.CodebookRows`) the codebook's moments live in its own optimizer.
    """
    if report is None or report.count == 0:
        return 0
    if (
        rows is not None
        and dict(engine.module.quantizer.named_parameters()).get(report.param_name) is rows.param
    ):
        return rows.clear_rows(report.groups, report.codes)
    quantizer = engine.module.quantizer
    param = dict(quantizer.named_parameters()).get(report.param_name)
    if param is None:
        raise RuntimeError(
            f"ResetReport names quantizer parameter {report.param_name!r}, which does not exist"
        )
    idx = _row_flat_index(param, report.groups.cpu(), report.codes.cpu()).reshape(-1)
    cleared = 0
    hp = _fragment(param)
    if _is_partitioned(param):
        if hp is None:  # this rank owns no slice of the parameter
            return 0
        start, numel = hp.lp_fragment_address.start, hp.lp_fragment_address.numel
        mine = idx[(idx >= start) & (idx < start + numel)]
        if mine.numel() == 0:
            return 0
        local = (mine - start).to(hp.hp_fragment.device)
        hp.hp_fragment.view(-1)[local] = (
            param.detach().reshape(-1)[mine.to(param.device)].to(hp.hp_fragment.dtype)
        )
        state = _flat_partition_state(engine, hp)
        off = hp.hp_fragment_address.start
        for key in ADAM_MOMENTS:
            if key in state:
                state[key].view(-1)[local + off] = 0
                cleared += local.numel()
        return cleared
    state = _base_optimizer(engine).state.get(param, {})
    for key in ADAM_MOMENTS:
        if key in state:
            state[key].view(-1)[idx.to(state[key].device)] = 0
            cleared += idx.numel()
    return cleared
