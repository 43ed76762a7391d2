"""Where a checkpoint is written, and read: every save, restore and export of a training run.

:class:`Checkpointer` is the one owner (one per worker), as torchtitan's ``CheckpointManager``:

- **save** (collective): refuse non-finite weights, consolidate usage counts, every rank's DeepSpeed part into
  a temporary directory that the one ``ray.train.report`` call uploads (:class:`~revq_ray.train.logs.Reporter`
  makes it), then ``complete.json`` and pruning (:meth:`Checkpointer.save`, :meth:`Checkpointer.commit`);
- **restore** (collective): the newest complete, intact checkpoint in storage, falling back past damaged
  ones (:meth:`Checkpointer.restore`);
- **export** (rank 0): ``export/latest`` and ``export/best`` (the model's ``save_pretrained`` through the
  ``exporter`` it is given: a ReVQModel's by default, the prior's from revq_ray.prior; swapped in atomically).

Where things go (``R = <storage>/<name>``, Ray Train's storage folder of the run; ``D`` the run's local
folder, ``RunPlan.run_dir``)::

    R/checkpoint_step000001234/    one checkpoint (below), the newest train.keep_checkpoints kept
    D/export/latest, D/export/best save_pretrained exports (ReVQModel.from_pretrained loads them)

A checkpoint directory holds::

    ds/                   engine.save_checkpoint(dir, tag="ds"): module + optimizer (+ ZeRO shards per rank)
    trainer_state.json    step, epoch, position in the epoch, best val_mse, world size, ...

    complete.json         written last, once every rank's part is in storage: the step and each file's
                          size. A checkpoint without it (a save interrupted by a kill) or whose files differ
                          from it (truncated, deleted) is never loaded.

Each rank writes its part into its own temporary directory and reports it; Ray Train merges them into one
directory in storage ``<storage>/<name>/checkpoint_step<09d>``. Which checkpoint a run resumes from is decided
here, from what storage holds, not from Ray Train's list of reported checkpoints (that list is saved by the
driver and lags behind storage when the driver is killed): the newest *complete and intact* checkpoint wins,
damaged ones are named and skipped (the steps after the one used are redone), and the folder is pruned to
``train.keep_checkpoints`` complete checkpoints after every save and every resume.

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
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from revq_ray.core.files import follow_umask
from revq_ray.runtime import get_logger
from revq_ray.train import guards

STATE_FILE = "trainer_state.json"
DS_TAG = "ds"
COMPLETE_FILE = "complete.json"
DIR_PREFIX = "checkpoint_step"


def dir_name(step: int) -> str:
    """The storage folder name of the checkpoint at ``step`` (sorts by step)."""
    return f"{DIR_PREFIX}{step:09d}"


@dataclass
class TrainerState:
    """Where training stands. ``step`` counts completed optimizer steps; ``epoch`` completed epochs;
    ``step_in_epoch`` completed steps of the current epoch (0 at an epoch boundary)."""

    step: int = 0
    epoch: int = 0
    step_in_epoch: int = 0
    best_val_mse: float | None = None
    best_val_loss: float | None = None  # the prior's (revq_ray.prior): validation cross-entropy, nats/token
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
            except Exception as err:  # truncated / corrupt: name the file (torch's message does not)
                first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
                raise RuntimeError(f"{path}: cannot be read, damaged ({first})") from None

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


def write_dir_atomic(out_dir: str | os.PathLike, write: Callable[[Path], Any]) -> Path:
    """Fill the folder ``out_dir`` with ``write(tmp)`` atomically: ``write`` fills a temporary folder beside
    it, which then replaces ``out_dir`` (a reader never sees a half-written folder)."""
    out = Path(out_dir)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        write(tmp)
        follow_umask(tmp)  # mkdtemp made it 0700: an export is for teammates too
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


def export_pretrained(module: torch.nn.Module, out_dir: str | os.PathLike) -> Path:
    """``save_pretrained`` of a ReVQModel into ``out_dir`` atomically (write beside it, then swap), so a
    reader never sees a half-written export. ``module`` is the live training module: its parameters are
    full fp32 at ZeRO 0-2."""
    # ZeRO 1/2 turn the module's parameters into views of one flat buffer, which safetensors (rightly) refuses
    # to save as is: export a fresh CPU copy of the model that owns its tensors.
    state = {k: v.detach().to("cpu", copy=True) for k, v in module.state_dict().items()}
    copy_ = type(module)(list(module.latent_shape), module.cfg.model_dump(mode="json"))
    copy_.load_state_dict(state)
    return write_dir_atomic(out_dir, lambda tmp: copy_.save_pretrained(str(tmp)))


# --------------------------------------------------------------------------------------------- in storage
@dataclass
class Stored:
    """A checkpoint folder in storage: its step, its path inside the filesystem, and what is wrong with it
    (``problem``: "" when complete and intact)."""

    step: int
    path: str
    problem: str = ""


def _files(fs: Any, path: str) -> dict[str, int]:
    """``{relative path: size}`` of every file under ``path`` (recursive), the marker excluded."""
    import pyarrow.fs as pafs

    out = {}
    for info in fs.get_file_info(pafs.FileSelector(path, recursive=True, allow_not_found=True)):
        if info.type == pafs.FileType.File:
            rel = info.path[len(path.rstrip("/")) + 1 :]
            if rel != COMPLETE_FILE:
                out[rel] = int(info.size)
    return out


def mark_complete(fs: Any, path: str, step: int) -> None:
    """Rank 0, once every rank's part of the checkpoint at ``path`` is in storage: write ``complete.json``
    (the step and each file's size), atomically. Until it exists the checkpoint does not count."""
    from revq_ray.data import fs as _fs

    files = _files(fs, path)
    if STATE_FILE not in files:
        raise RuntimeError(f"{path}: no {STATE_FILE} after every rank saved: the checkpoint is incomplete")
    doc = {"step": step, "files": files}
    _fs.write_bytes_atomic(fs, _fs.join(path, COMPLETE_FILE), json.dumps(doc, indent=1).encode())


def check_stored(fs: Any, path: str) -> str:
    """What is wrong with the checkpoint folder ``path`` ("" if nothing): no completeness marker (the save
    was interrupted), or a file missing, truncated or grown since the marker listed it."""
    from revq_ray.data import fs as _fs

    marker = _fs.join(path, COMPLETE_FILE)
    if not _fs.is_file(fs, marker):
        return f"incomplete (no {COMPLETE_FILE}: the save was interrupted)"
    try:
        want = json.loads(_fs.read_bytes(fs, marker))["files"]
    except (ValueError, KeyError, TypeError) as err:
        return f"{marker}: unreadable ({type(err).__name__})"
    have = _files(fs, path)
    for rel, size in sorted(want.items()):
        if rel not in have:
            return f"{_fs.join(path, rel)} is missing"
        if have[rel] != size:
            return (
                f"{_fs.join(path, rel)} has {have[rel]:,} bytes, {size:,} when saved (damaged or truncated)"
            )
    return ""


def list_stored(storage: str, name: str) -> tuple[Any, list[Stored]]:
    """The checkpoint folders of run ``name`` under ``storage`` (a local path or URI), newest first, each
    checked (:func:`check_stored`). Returns ``(pyarrow filesystem, [Stored, ...])``."""
    import pyarrow.fs as pafs

    from revq_ray.data import fs as _fs

    fs, root = _fs.resolve(storage)
    run_root = _fs.join(root, name)
    found = []
    for info in fs.get_file_info(pafs.FileSelector(run_root, recursive=False, allow_not_found=True)):
        base = info.base_name
        if (
            info.type == pafs.FileType.Directory
            and base.startswith(DIR_PREFIX)
            and base[len(DIR_PREFIX) :].isdigit()
        ):
            found.append(Stored(int(base[len(DIR_PREFIX) :]), info.path))
    found.sort(key=lambda s: -s.step)
    for s in found:
        s.problem = check_stored(fs, s.path)
    return fs, found


def forget_ray_history(storage: str, name: str) -> None:
    """Driver, before the run's controller starts: drop Ray Train's saved list of reported checkpoints
    (``checkpoint_manager_snapshot.json``). The workers choose the checkpoint from storage, so the list adds
    nothing, and it would stop the run: Ray refuses to start when it names a folder that the pruning here
    removed (``CheckpointManagerInitializationError``)."""
    from revq_ray.data import fs as _fs

    try:
        from ray.train.v2._internal.constants import CHECKPOINT_MANAGER_SNAPSHOT_FILENAME as snapshot
    except ImportError:  # pragma: no cover - the name of Ray 2.60
        snapshot = "checkpoint_manager_snapshot.json"
    fs, root = _fs.resolve(storage)
    path = _fs.join(_fs.join(root, name), snapshot)
    if _fs.is_file(fs, path):
        fs.delete_file(path)


def has_usable(storage: str, name: str) -> bool:
    """Whether run ``name`` has a complete, intact checkpoint to resume from."""
    _, found = list_stored(storage, name)
    return any(not s.problem for s in found)


def prune(fs: Any, found: list[Stored], keep: int, resumed_step: int, log: Any) -> None:
    """Rank 0: keep the newest ``keep`` usable checkpoints; delete older ones, unusable ones older than the
    newest kept (nothing can load them), and every folder newer than ``resumed_step`` (an interrupted save, or
    a damaged one we fell back from: its step is about to be redone and must not mix with old files)."""
    usable = [s for s in found if not s.problem and s.step <= resumed_step]
    kept = {s.step for s in usable[:keep]}
    newest_kept = max(kept, default=-1)
    for s in found:
        if s.step in kept:
            continue
        why = (
            f"newer than step {resumed_step}, which this run continues from ({s.problem or 'not loaded'})"
            if s.step > resumed_step
            else (f"unusable: {s.problem}" if s.problem else f"beyond train.keep_checkpoints={keep}")
        )
        if s.step > resumed_step or s.step < newest_kept:
            if s.step > resumed_step or s.problem:
                log(f"removing checkpoint {s.path}: {why}")
            fs.delete_dir(s.path)


def existing_exports(run_dir: Any) -> list[str]:
    """The export folders of a run that exist (``export/best``, ``export/latest``), as strings; ``run_dir``
    may be a URI (a run mirrored to an object store)."""
    from revq_ray.data import fs as _fs
    from revq_ray.runtime import join_location

    if not run_dir:
        return []
    fs, root = _fs.resolve(str(run_dir))
    return [
        join_location(str(run_dir), "export", n)
        for n in ("best", "latest")
        if _fs.is_file(fs, _fs.join(root, f"export/{n}/model.safetensors"))
    ]


@contextlib.contextmanager
def _local_dir(checkpoint: Any, rank: int) -> Iterator[str]:
    """The checkpoint as a local folder: itself on a local filesystem; a download of this rank's own from an
    object store. Not Ray's ``as_directory()`` there: its folder is shared by the ranks of a node, and a rank
    that finds the download lock free downloads again into it, truncating the files another rank is reading
    (restores from s3:// failed with "PytorchStreamReader failed reading file" on two ranks per node)."""
    import pyarrow.fs as pafs

    if isinstance(checkpoint.filesystem, pafs.LocalFileSystem):
        yield checkpoint.path
        return
    tmp = tempfile.mkdtemp(prefix=f"revq_restore_r{rank}_")
    try:
        yield checkpoint.to_directory(tmp)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


# --------------------------------------------------------------------------------------------- the owner
class Checkpointer:
    """Save, restore and export for one worker of a run (see the module docstring).

    Args:
        rank, world: this worker's rank and the world size.
        gather: ``obj -> [obj of every rank]`` (all_gather_object; ``[obj]`` in one process).
        storage: Ray Train's storage path (local or URI); ``name`` the run's name (its folder there).
        run_dir: the run's local folder (exports go under ``run_dir/export``).
        keep: ``train.keep_checkpoints``.
        exporter: ``(module, folder) -> None`` writes an export of the live module (default: a ReVQModel's
            :func:`export_pretrained`; the prior passes its own). Nothing else here depends on the model.
    """

    def __init__(self, rank: int, world: int, gather: Callable[[Any], list[Any]], *, storage: str, name: str,
                 run_dir: str | os.PathLike, keep: int,
                 exporter: Callable[[torch.nn.Module, Path], Any] | None = None):  # fmt: skip
        self.rank, self.world, self.gather = rank, world, gather
        self.exporter = exporter or export_pretrained
        self.storage, self.name, self.run_dir, self.keep = storage, name, Path(run_dir), keep
        self.engine: Any = None  # set by restore
        self.rows: Any = None
        self.last_step = 0  # the step of the newest checkpoint saved or restored
        self._log = get_logger("revq_ray.train").info
        # What storage holds decides where to resume (not Ray Train's list of reported checkpoints, which lags
        # behind storage when the driver was killed).
        self.stored: tuple[Any, list[Stored]] = list_stored(storage, name)

    @property
    def resuming(self) -> bool:
        """Whether storage holds a complete, intact checkpoint (the model then needs no fresh init)."""
        return any(not s.problem for s in self.stored[1])

    # ----------------------------------------------------------------------------------------- restore
    def restore(self, engine: Any, rows: Any = None) -> TrainerState:
        """Collective: load into ``engine`` (kept for the saves) the newest complete, intact checkpoint in
        storage, falling back past damaged ones with a message that names the file and the steps lost; rank 0
        then prunes the folder. A fresh state when storage holds none."""
        self.engine, self.rows = engine, rows  # rows: the codebook's own optimizer (codebook.py), or None
        fs, found = self.stored
        warn = get_logger("revq_ray.train").warning if self.rank == 0 else (lambda *a: None)
        newest = found[0].step if found else 0
        for s in found:
            if s.problem:
                warn(f"checkpoint of step {s.step} not used: {s.problem}")
                continue
            error = ""
            try:
                import ray.train

                with _local_dir(ray.train.Checkpoint(s.path, filesystem=fs), self.rank) as d:
                    state = load(self.engine, d, self.rank, self.world, self.rows)
            except UntrustedCheckpointError:
                raise  # a planted pickle is refused loudly, never skipped past
            except Exception as err:  # damaged beyond what the sizes show
                first = str(err).strip().splitlines()[0] if str(err) else ""
                error = f"rank {self.rank}: {type(err).__name__}: {first}"
            failed = [e for e in self.gather(error) if e]
            if failed:  # every rank moves on together
                warn(f"checkpoint of step {s.step} not used: {'; '.join(failed)}")
                continue
            if self.rank == 0:
                lost = f"; steps {s.step + 1}-{newest} are lost and will be redone" if newest > s.step else ""
                self._log(
                    f"resumed from {s.path}: step {state.step}, epoch {state.epoch} (+{state.step_in_epoch} "
                    f"steps){lost}"
                )
                prune(fs, found, self.keep, s.step, self._log)
            self.last_step = state.step
            return state
        if any(not s.problem for s in found):
            raise RuntimeError(
                f"no checkpoint of run {self.name} in {self.storage} could be loaded (see the messages "
                "above); delete the damaged checkpoint_step* folders to start this run again from scratch"
            )
        if (
            found and self.rank == 0
        ):  # only unusable ones: a fresh start (the codebook was initialized for it)
            prune(fs, found, self.keep, -1, self._log)
        return TrainerState(world_size=self.world)

    # ----------------------------------------------------------------------------------------- save
    def due(self, step: int) -> bool:
        """Whether ``step`` has no checkpoint yet (a resumed run does not save its first step again)."""
        return step > self.last_step

    @contextlib.contextmanager
    def save(self, state: TrainerState) -> Iterator[Any]:
        """Collective: every rank saves its DeepSpeed part into a temporary directory and gets a
        ``ray.train.Checkpoint`` of it to hand to ``ray.train.report`` (which uploads it) inside the block;
        the directory is removed after. Refuses non-finite weights (nothing non-finite is ever saved)."""
        from ray.train import Checkpoint

        bad = guards.nonfinite_params(self.engine.module)
        if bad:
            raise guards.NonFiniteError(
                f"non-finite parameters at step {state.step} ({', '.join(bad[:5])}): training stopped before "
                "checkpointing or exporting them",
                state.step,
            )
        tmp = tempfile.mkdtemp(prefix=f"revq_ckpt_r{self.rank}_")
        try:
            save(self.engine, state, tmp, self.rank, self.world, self.rows)
            self.last_step = state.step
            yield Checkpoint.from_directory(tmp)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)

    def commit(self, step: int) -> None:
        """Collective, after every rank reported (and so uploaded) its part of the checkpoint at ``step``:
        rank 0 marks it complete, then prunes the folder to ``train.keep_checkpoints``. A kill before the
        marker leaves a folder that no resume will load (and the next resume removes)."""
        self.gather(None)  # a barrier: Ray Train uploads each rank's part inside its report call
        if self.rank != 0:
            return
        from revq_ray.data import fs as _fs

        fs, root = _fs.resolve(self.storage)
        mark_complete(fs, _fs.join(_fs.join(root, self.name), dir_name(step)), step)
        fs, found = list_stored(self.storage, self.name)
        prune(fs, found, self.keep, step, self._log)

    # ----------------------------------------------------------------------------------------- export
    def export(self, names: tuple[str, ...]) -> None:
        """Rank 0: the exporter's copy of the live model into ``run_dir/export/<name>`` for each name
        (``latest``, ``best``)."""
        if self.rank != 0:
            return
        for name in names:
            self.exporter(self.engine.module, self.run_dir / "export" / name)

    def exports(self) -> list[str]:
        """The exports this run has (``export/best``, ``export/latest``)."""
        return existing_exports(self.run_dir)
