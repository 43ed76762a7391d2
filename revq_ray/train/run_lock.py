"""One run per name at a time: the driver owns its run folder while it trains.

``python -m revq_ray.train`` (and everything that calls :func:`revq_ray.train.run`) holds
``<output_dir>/<name>/owner.json`` from before the first worker starts until it returns. The file names the
owner (host, pid, start time) and carries a heartbeat the owner refreshes every ``HEARTBEAT_S`` seconds. A
second start with the same name and output folder stops at once, naming the owner, unless that owner is gone:

- an owner on this host whose pid no longer runs is dead (a ``kill -9``, a crash): its lock is broken;
- an owner on another host (shared storage, an object store) is taken as dead when its heartbeat is older than
  ``REVQ_RUN_LOCK_STALE_S`` (default 120 s, four missed heartbeats).

Guarantees. On a local or shared POSIX file system the lock is created with ``O_CREAT | O_EXCL``: of two
starts, however close, exactly one wins. An object store (``s3://``, ``gs://``) has no create-if-absent in
the API we use (pyarrow), so there the lock is *write, wait, read back*: each start writes its own nonce,
waits ``REVQ_RUN_LOCK_SETTLE_S`` (default 2 s), and proceeds only if the file still holds its nonce. With a
store that reads its own writes (S3 has since 2020, GCS always), two starts collide only if one writes
after the other has already read back its nonce, i.e. if the writes are more than the settle time apart and
yet neither saw the other's file: a start that comes later than that finds the first one's lock and stops.
"""

from __future__ import annotations

import json
import os
import socket
import threading
import time
from typing import Any

from revq_ray.data import fs as _fs
from revq_ray.runtime import get_logger, is_uri
from revq_ray.train.jit import _pid_alive  # the JIT owner lock's liveness check, one copy

OWNER_FILE = "owner.json"
HEARTBEAT_S = 30.0

_log = get_logger("revq_ray.train")


class RunLockedError(RuntimeError):
    """Another live process is training this run (same name and output folder)."""


def _stale_s() -> float:
    return float(os.environ.get("REVQ_RUN_LOCK_STALE_S", "120"))


class RunLock:
    """The owner lock of the run folder ``<storage>/<name>`` (local path or URI). Use as a context manager,
    or :meth:`acquire` / :meth:`release`."""

    def __init__(self, storage: str, name: str, *, heartbeat_s: float = HEARTBEAT_S):
        self.storage, self.name = storage, name
        self.fs, root = _fs.resolve(storage)
        self.run_root = _fs.join(root, name)
        self.path = _fs.join(self.run_root, OWNER_FILE)
        self.heartbeat_s = heartbeat_s
        self.nonce = os.urandom(8).hex()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    # ------------------------------------------------------------------------------------------ owner file
    def _me(self) -> dict[str, Any]:
        now = time.time()
        return {"host": socket.gethostname(), "pid": os.getpid(), "since": self._since, "heartbeat": now,
                "nonce": self.nonce}  # fmt: skip

    def _read(self) -> dict[str, Any] | None:
        try:
            if not _fs.is_file(self.fs, self.path):
                return None
            return json.loads(_fs.read_bytes(self.fs, self.path))
        except FileNotFoundError:
            return None
        except (OSError, ValueError):
            return {}  # being written right now, or garbage: judged by its age below

    def _dead(self, owner: dict[str, Any]) -> bool:
        if owner.get("host") == socket.gethostname() and "pid" in owner:
            return not _pid_alive(int(owner["pid"]))
        beat = owner.get("heartbeat")
        if beat is None:  # unreadable: a writer died mid-write, or writes right now
            try:
                beat = self.fs.get_file_info(self.path).mtime.timestamp()
            except (AttributeError, OSError):
                return False
        return time.time() - float(beat) > _stale_s()

    def _describe(self, owner: dict[str, Any]) -> str:
        since = owner.get("since")
        started = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(since)) if since else "?"
        beat = owner.get("heartbeat")
        ago = f", last heartbeat {time.time() - float(beat):.0f}s ago" if beat else ""
        return f"pid {owner.get('pid', '?')} on host {owner.get('host', '?')} (started {started}{ago})"

    def _create_local(self) -> bool:
        try:
            fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o666)
        except FileExistsError:
            return False
        with os.fdopen(fd, "w") as f:
            json.dump(self._me(), f)
        return True

    def _create_remote(self) -> bool:
        if self._read() is not None:
            return False
        _fs.write_bytes_atomic(self.fs, self.path, json.dumps(self._me()).encode())
        time.sleep(float(os.environ.get("REVQ_RUN_LOCK_SETTLE_S", "2")))
        got = self._read()
        if got is not None and got.get("nonce") == self.nonce:
            return True
        raise RunLockedError(self._message(got or {}))

    def _message(self, owner: dict[str, Any]) -> str:
        return (
            f"run {self.name} in {self.storage} is being trained right now by {self._describe(owner)}: a "
            "second start with the same name would write into the same checkpoints. Wait for it to finish, "
            f"stop it, or choose another name. If that process is gone for good, delete {self.path}"
        )

    # ------------------------------------------------------------------------------------------ public
    def acquire(self) -> RunLock:
        """Take the lock or raise :class:`RunLockedError` naming the live owner (at once, no waiting)."""
        self._since = time.time()
        _fs.makedirs(self.fs, self.run_root)
        create = self._create_remote if is_uri(self.storage) else self._create_local
        for _ in range(3):
            if create():
                break
            owner = self._read()
            if owner is None:
                continue  # released between our try and our read
            if not self._dead(owner):
                raise RunLockedError(self._message(owner))
            _log.warning("run %s: breaking the lock of %s, which is gone", self.name, self._describe(owner))
            self.fs.delete_file(self.path)
        else:
            raise RunLockedError(self._message(self._read() or {}))
        self._thread = threading.Thread(target=self._beat, name="revq-run-lock", daemon=True)
        self._thread.start()
        return self

    def _beat(self) -> None:
        while not self._stop.wait(self.heartbeat_s):
            try:
                owner = self._read()
                if owner and owner.get("nonce") == self.nonce:
                    _fs.write_bytes_atomic(self.fs, self.path, json.dumps(self._me()).encode())
            except Exception as err:  # storage hiccup: the next beat tries again
                _log.warning("run %s: heartbeat of %s failed (%s)", self.name, self.path, err)

    def release(self) -> None:
        """Stop the heartbeat and delete the lock if it is still ours."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=10)
        try:
            owner = self._read()
            if owner and owner.get("nonce") == self.nonce:
                self.fs.delete_file(self.path)
        except OSError as err:
            _log.warning("run %s: could not remove %s (%s)", self.name, self.path, err)

    def __enter__(self) -> RunLock:
        return self.acquire()

    def __exit__(self, *exc: Any) -> None:
        self.release()
