"""Training checkpoints (DeepSpeed, every rank) and Hugging Face exports (rank 0).

A Ray Train checkpoint directory holds::

    ds/                   engine.save_checkpoint(dir, tag="ds"): module + optimizer (+ ZeRO shards per rank)
    trainer_state.json    step, epoch, position in the epoch, best val_mse, world size, ...

Each rank writes its part into its own temporary directory and reports it; Ray Train merges them into one
directory in storage. On restore every rank loads the merged directory.

Code-usage counts are a *sum over ranks* (each rank counts its own tokens; resets all-reduce them). DeepSpeed
saves the module state of rank 0 only, so before saving the counts are consolidated onto rank 0 (rank 0
holds the global sum, the others zero: the sum over ranks is unchanged); after loading, every rank but 0
zeroes its counts again. A resumed run therefore resets on exactly the counts an uninterrupted one would.
"""

from __future__ import annotations

import contextlib
import json
import os
import pickle
import shutil
import tempfile
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

STATE_FILE = "trainer_state.json"
DS_TAG = "ds"


@dataclass
class TrainerState:
    """Where training stands. ``step`` counts completed optimizer steps; ``epoch`` completed epochs;
    ``step_in_epoch`` completed steps of the current epoch (0 at an epoch boundary)."""

    step: int = 0
    epoch: int = 0
    step_in_epoch: int = 0
    best_val_mse: float | None = None
    world_size: int = 1
    resets: int = 0
    samples: int = 0

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=1)

    @classmethod
    def from_json(cls, text: str) -> TrainerState:
        data = json.loads(text)
        known = {k: data[k] for k in cls.__dataclass_fields__ if k in data}
        return cls(**known)


def _counts_buffer(module: torch.nn.Module) -> torch.Tensor | None:
    q = getattr(module, "quantizer", None)
    c = getattr(q, "counts", None)
    return c if isinstance(c, torch.Tensor) else None


@torch.no_grad()
def consolidate_counts(module: torch.nn.Module, rank: int, world_size: int) -> None:
    """Collective: rank 0's counts become the global sum, the other ranks' zero (sum unchanged)."""
    counts = _counts_buffer(module)
    if counts is None or world_size == 1:
        return
    import torch.distributed as dist

    dist.all_reduce(counts, op=dist.ReduceOp.SUM)
    if rank != 0:
        counts.zero_()


def save(
    engine: Any,
    state: TrainerState,
    ckpt_dir: str | os.PathLike,
    rank: int,
    world_size: int,
    rows: Any = None,
) -> None:
    """Collective: every rank writes its DeepSpeed part into ``ckpt_dir``; rank 0 adds the trainer state and
    (``train.codebook_update`` rows*) the codebook's own optimizer state (replicated: rank 0's copy is
    all)."""
    consolidate_counts(engine.module, rank, world_size)
    engine.save_checkpoint(str(ckpt_dir), tag=DS_TAG, save_latest=False)
    if rows is not None:
        rows.save(ckpt_dir, rank)
    if rank == 0:
        Path(ckpt_dir, STATE_FILE).write_text(state.to_json())


class UntrustedCheckpointError(RuntimeError):
    """A checkpoint file holds pickled Python objects beyond tensors and plain data: it was not written by
    this trainer (or was tampered with), and loading it could run code."""


def _deepspeed_safe_globals() -> list[Any]:
    """The non-tensor types DeepSpeed pickles into its checkpoints (ZeRO 1/2 optimizer states): plain data
    classes whose unpickling runs no code of the file's choosing."""
    from deepspeed.runtime.fp16.loss_scaler import LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    return [LossScaler, ZeroStageEnum, fragment_address]


@contextlib.contextmanager
def weights_only_loads(engine: Any) -> Iterator[None]:
    """While active, every file DeepSpeed loads through ``engine.checkpoint_engine`` is read with
    ``torch.load(weights_only=True)`` (tensors, plain containers and the allowlist above), not with
    DeepSpeed's ``weights_only=False``: whoever can write the checkpoint folder cannot run code on workers."""
    ce = engine.checkpoint_engine
    allowed = _deepspeed_safe_globals()

    def _load(path: str, map_location: Any = None) -> Any:
        with torch.serialization.safe_globals(allowed):
            try:
                return torch.load(path, map_location=map_location, weights_only=True)
            except pickle.UnpicklingError as err:
                first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
                raise UntrustedCheckpointError(
                    f"{path}: refusing to load this checkpoint file: it holds pickled objects that are not "
                    f"tensors or plain data ({first}). It was not written by this trainer or was modified; "
                    "delete the checkpoint (or the run folder) if you do not trust it"
                ) from None

    ce.load = _load  # instance attribute: shadows the class's method until restored
    try:
        yield
    finally:
        del ce.load


def load(
    engine: Any, ckpt_dir: str | os.PathLike, rank: int, world_size: int, rows: Any = None
) -> TrainerState:
    """Collective: restore module, optimizer and trainer state from a (merged) checkpoint directory.

    With a different world size than at save time, ZeRO optimizer shards do not fit: the module is loaded
    and DeepSpeed's optimizer starts fresh (said loudly). The codebook's own optimizer (``rows``) is
    replicated, so it is restored whatever the world size, when the checkpoint holds one of its mode."""
    state = TrainerState.from_json(Path(ckpt_dir, STATE_FILE).read_text())
    same_world = state.world_size == world_size
    if not same_world and rank == 0:
        from revq_ray.runtime import get_logger

        get_logger("revq_ray.train").warning(
            "checkpoint was written by %d workers, now %d: loading the model only; optimizer moments start "
            "from zero",
            state.world_size,
            world_size,
        )
    with weights_only_loads(engine):
        path, _ = engine.load_checkpoint(
            str(ckpt_dir),
            tag=DS_TAG,
            load_optimizer_states=same_world,
            load_lr_scheduler_states=False,
            load_module_only=not same_world,
        )
    if path is None:
        raise RuntimeError(f"DeepSpeed found no checkpoint under {ckpt_dir}/{DS_TAG}")
    if rows is not None and not rows.load(ckpt_dir) and rank == 0:
        from revq_ray.runtime import get_logger

        get_logger("revq_ray.train").warning(
            "checkpoint holds no codebook optimizer state for train.codebook_update=%s: its moments start "
            "from zero",
            rows.mode,
        )
    counts = _counts_buffer(engine.module)
    if counts is not None and rank != 0:
        counts.zero_()
    state.world_size = world_size
    return state


def export_pretrained(module: torch.nn.Module, out_dir: str | os.PathLike) -> Path:
    """``save_pretrained`` of a ReVQModel into ``out_dir`` atomically (write beside it, then swap), so a
    reader never sees a half-written export. ``module`` is the live training module: its parameters are
    full fp32 at ZeRO 0-2."""
    out = Path(out_dir)
    out.parent.mkdir(parents=True, exist_ok=True)
    # ZeRO 1/2 turn the module's parameters into views of one flat buffer, which safetensors (rightly) refuses
    # to save as is: export a fresh CPU copy of the model that owns its tensors.
    state = {k: v.detach().to("cpu", copy=True) for k, v in module.state_dict().items()}
    copy_ = type(module)(list(module.latent_shape), module.cfg.model_dump(mode="json"))
    copy_.load_state_dict(state)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        copy_.save_pretrained(str(tmp))
        old = out.with_name(f".{out.name}.old")
        if old.exists():
            shutil.rmtree(old)
        if out.exists():
            os.replace(out, old)
        os.replace(tmp, out)
        shutil.rmtree(old, ignore_errors=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out
