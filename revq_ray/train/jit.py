"""Load DeepSpeed's JIT-compiled ops so that a killed build can never block later runs.

DeepSpeed compiles some ops on first use (on CPU: ``deepspeed_shm_comm``, loaded when the engine sets up
its communication backend) under ``$TORCH_EXTENSIONS_DIR/<op>/`` behind torch's ``FileBaton``: a bare
``lock`` file that names no owner. A process killed while holding it (Ctrl-C during a first start, a killed
job or test) leaves that file behind, and every later process waits for it forever, silently, at 0% CPU.

:func:`load_deepspeed_ops` loads the ops before DeepSpeed asks for them (DeepSpeed then reuses the loaded
module: its builders cache loaded ops per process) under a lock of our own, ``<op>/owner.json``, that records
the owner's host and pid:

- an owner on this host whose pid is gone is dead: its lock, and torch's ``lock`` beside it, are removed;
- while we hold the owner lock every builder that goes through us waits for us, so a torch ``lock`` found
  then was left by a dead process and is removed;
- a live owner is waited for at most ``timeout_s`` (``REVQ_JIT_LOCK_TIMEOUT_S``, default 900 s), then a
  :class:`TimeoutError` names the owner, the file and what to do.
"""

from __future__ import annotations

import json
import os
import socket
import time
from pathlib import Path
from typing import Any

OWNER_FILE = "owner.json"
TORCH_LOCK = "lock"
DEFAULT_TIMEOUT_S = float(os.environ.get("REVQ_JIT_LOCK_TIMEOUT_S", "900"))


def _log(msg: str) -> None:
    print(f"[revq_ray.jit] {msg}", flush=True)


def build_dir(op_name: str) -> Path:
    """The folder torch builds JIT extension ``op_name`` in (``$TORCH_EXTENSIONS_DIR/<op>`` when set; the
    driver sets it for the workers)."""
    env = os.environ.get("TORCH_EXTENSIONS_DIR")
    if env:
        return Path(env) / op_name
    from torch.utils.cpp_extension import _get_build_directory  # torch's own rule for the default

    return Path(_get_build_directory(op_name, verbose=False))


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by another user
        return True
    return True


def _read_owner(path: Path) -> dict[str, Any] | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def _owner_is_dead(owner: dict[str, Any] | None, path: Path) -> bool:
    if owner is None:  # unreadable: a writer died between create and write, or is writing right now
        try:
            return time.time() - path.stat().st_mtime > 10
        except FileNotFoundError:
            return False
    if owner.get("host") != socket.gethostname():
        return False  # another machine sharing this folder: cannot check, wait for it
    return not _pid_alive(int(owner.get("pid", -1)))


class OwnerLock:
    """An exclusive lock file recording its owner (host, pid, time), broken when that owner is dead."""

    def __init__(self, folder: str | os.PathLike, timeout_s: float = DEFAULT_TIMEOUT_S, poll_s: float = 0.2):
        self.folder = Path(folder)
        self.path = self.folder / OWNER_FILE
        self.timeout_s, self.poll_s = timeout_s, poll_s

    def _try_create(self) -> bool:
        try:
            fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            return False
        info = {"host": socket.gethostname(), "pid": os.getpid(), "since": time.time()}
        with os.fdopen(fd, "w") as f:
            json.dump(info, f)
        return True

    def acquire(self) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)
        t0 = time.time()
        while not self._try_create():
            owner = _read_owner(self.path)
            if _owner_is_dead(owner, self.path):
                _log(f"removing stale lock {self.path} (owner {owner} is gone)")
                self.path.unlink(missing_ok=True)
                continue
            if time.time() - t0 > self.timeout_s:
                raise TimeoutError(
                    f"waited {self.timeout_s:.0f}s for {self.path}, held by {owner or 'an unknown process'} "
                    f"(building or loading a DeepSpeed op in {self.folder}). If that process is stuck, stop "
                    f"it; if it no longer runs, delete {self.path} and {self.folder / TORCH_LOCK}. "
                    "REVQ_JIT_LOCK_TIMEOUT_S sets this timeout"
                )
            time.sleep(self.poll_s)

    def release(self) -> None:
        owner = _read_owner(self.path)
        mine = owner is not None and owner.get("pid") == os.getpid()
        if mine and owner.get("host") == socket.gethostname():  # type: ignore[union-attr]
            self.path.unlink(missing_ok=True)

    def __enter__(self) -> OwnerLock:
        self.acquire()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.release()


def _shm_builder() -> Any | None:
    """DeepSpeed's shared-memory comm op builder when the accelerator uses it (CPU), else None."""
    import deepspeed
    from deepspeed.accelerator import get_accelerator

    builder = get_accelerator().create_op_builder("ShareMemCommBuilder")
    if builder is None or not deepspeed.ops.__compatible_ops__.get(builder.NAME, False):
        return None
    return builder


def load_op(builder: Any, timeout_s: float = DEFAULT_TIMEOUT_S) -> Any:
    """``builder.load()`` under an :class:`OwnerLock` in the op's build folder; clears a dead build's lock."""
    folder = build_dir(builder.name)
    with OwnerLock(folder, timeout_s):
        stale = folder / TORCH_LOCK
        if stale.exists():
            # We hold the owner lock, so no builder that goes through us is running: a dead one left this.
            _log(f"removing stale torch extension lock {stale} (left by a killed build)")
            stale.unlink(missing_ok=True)
        return builder.load(verbose=False)


def load_deepspeed_ops(timeout_s: float = DEFAULT_TIMEOUT_S) -> list[str]:
    """Build/load the JIT ops DeepSpeed will ask for in this process; returns their names."""
    builder = _shm_builder()
    if builder is None:
        return []
    load_op(builder, timeout_s)
    return [builder.name]


__all__ = ["OwnerLock", "build_dir", "load_deepspeed_ops", "load_op"]
