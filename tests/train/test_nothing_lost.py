"""Nothing lost, round two (issue 25): one run per name at a time, resume from the newest complete checkpoint,
damaged files named with a fall back, and the folder pruned to ``train.keep_checkpoints`` after an
interruption too."""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from revq_ray.train.jit import _pid_alive

from .conftest import ROOT, make_cfg, read_metrics

pytestmark = pytest.mark.train


def _dead_pid() -> int:
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    return p.pid


# --------------------------------------------------------------------------------------------- the owner lock
def test_run_lock_refuses_a_live_owner_and_breaks_a_dead_one(tmp_path):
    from revq_ray.train.run_lock import OWNER_FILE, RunLock, RunLockedError

    with RunLock(str(tmp_path), "r1") as lock:
        owner = json.loads((tmp_path / "r1" / OWNER_FILE).read_text())
        assert owner["pid"] == os.getpid() and owner["nonce"] == lock.nonce
        with pytest.raises(RunLockedError, match=rf"run r1 in .* by pid {os.getpid()} on host "):
            RunLock(str(tmp_path), "r1").acquire()
    assert not (tmp_path / "r1" / OWNER_FILE).exists()  # released

    # a kill -9 leaves the file behind: its pid is gone on this host, so the lock is broken
    (tmp_path / "r1" / OWNER_FILE).write_text(json.dumps({"host": socket.gethostname(), "pid": _dead_pid()}))
    with RunLock(str(tmp_path), "r1"):
        pass
    # another host: judged by its heartbeat
    other = {"host": "elsewhere", "pid": 1, "since": time.time(), "nonce": "x"}
    (tmp_path / "r1" / OWNER_FILE).write_text(json.dumps({**other, "heartbeat": time.time()}))
    with pytest.raises(RunLockedError, match="pid 1 on host elsewhere .*last heartbeat"):
        RunLock(str(tmp_path), "r1").acquire()
    (tmp_path / "r1" / OWNER_FILE).write_text(json.dumps({**other, "heartbeat": time.time() - 600}))
    with RunLock(str(tmp_path), "r1"):
        pass


def test_run_lock_on_an_object_store_style_location(tmp_path, monkeypatch):
    """Without create-if-absent (URIs): write, settle, read back. The second start is refused."""
    from revq_ray.train.run_lock import RunLock, RunLockedError

    monkeypatch.setenv("REVQ_RUN_LOCK_SETTLE_S", "0.2")
    uri = f"file://{tmp_path}"
    with RunLock(uri, "r2"), pytest.raises(RunLockedError, match="run r2 in file://"):
        RunLock(uri, "r2").acquire()
    with RunLock(uri, "r2"):  # released, so free again
        pass


# --------------------------------------------------------------------------------------------- end to end
def _debug_cmd(out: Path, name: str, *sets: str) -> list[str]:
    base = [
        f"output_dir={out}", f"name={name}", "train.checkpoint_every=6", "train.keep_checkpoints=2",
        "train.epochs=4", "train.max_failures=0",
    ]  # fmt: skip
    cmd = [sys.executable, "-m", "revq_ray.train", "--config", str(ROOT / "configs" / "debug.yaml")]
    for s in [*base, *sets]:
        cmd += ["--set", s]
    return cmd


def _complete_steps(run_dir: Path) -> list[int]:
    return sorted(
        int(p.parent.name.rsplit("step", 1)[1]) for p in run_dir.glob("checkpoint_step*/complete.json")
    )


@pytest.mark.slow
def test_one_owner_then_kill_9_resumes_from_the_newest_complete_checkpoint(tmp_path):
    """Issue 25.1 + 25.2: a second start of a running name stops at once naming the owner; the owner killed
    with SIGKILL (driver, controller and workers) leaves a stale lock and a checkpoint history Ray Train had
    not saved; the rerun breaks the lock, resumes from the newest complete checkpoint in storage, and ends
    with every step once and at most keep_checkpoints checkpoints."""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    run_dir = tmp_path / "runs" / "owned"
    log1 = open(tmp_path / "first.log", "w")  # noqa: SIM115 - closed below
    first = subprocess.Popen(
        _debug_cmd(tmp_path / "runs", "owned", "train.epochs=40"), cwd=tmp_path, env=env, stdout=log1,
        stderr=subprocess.STDOUT, start_new_session=True,
    )  # fmt: skip
    try:
        deadline = time.time() + 600
        while time.time() < deadline and not (run_dir / "owner.json").is_file() and first.poll() is None:
            time.sleep(0.2)
        assert first.poll() is None, (tmp_path / "first.log").read_text()[-3000:]
        t0 = time.time()
        second = subprocess.run(
            _debug_cmd(tmp_path / "runs", "owned"), cwd=tmp_path, env=env, capture_output=True, text=True,
            timeout=300,
        )  # fmt: skip
        assert second.returncode == 2, second.stderr[-3000:]
        assert re.search(
            rf"run owned in .* being trained right now by pid {first.pid} on host", second.stderr
        )
        assert time.time() - t0 < 60  # at once: no Ray started, no shards touched
        # Let it write a few checkpoints, then kill everything it started at once.
        # (keep_checkpoints=2 keeps two at a time: wait for the third save, step 18)
        while (
            time.time() < deadline and max(_complete_steps(run_dir), default=0) < 18 and first.poll() is None
        ):
            time.sleep(0.2)
        assert first.poll() is None, (tmp_path / "first.log").read_text()[-3000:]
        os.killpg(first.pid, signal.SIGKILL)
        first.wait(timeout=60)
    finally:
        if first.poll() is None:
            os.killpg(first.pid, signal.SIGKILL)
        log1.close()
    # Ray starts its workers in process groups of their own: a worker outlives the driver's group until it
    # notices its raylet is gone, and may commit one more checkpoint meanwhile (seen at 18 -> 24 on a loaded
    # machine; a legitimate newest checkpoint). Wait for it before reading what storage holds.
    workers = [w["pid"] for w in json.loads((run_dir / "workers.json").read_text())]
    gone = time.time() + 120
    while time.time() < gone and any(_pid_alive(pid) for pid in workers):
        time.sleep(0.2)
    newest = _complete_steps(run_dir)[-1]
    assert json.loads((run_dir / "owner.json").read_text())["pid"] == first.pid  # left behind by the kill

    third = subprocess.run(
        _debug_cmd(tmp_path / "runs", "owned", "train.epochs=40", f"train.max_steps={newest + 6}"),
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=900,
    )  # fmt: skip
    said = third.stdout + third.stderr
    assert third.returncode == 0, said[-4000:]
    assert "breaking the lock" in said
    assert re.search(rf"resumed from \S*checkpoint_step{newest:09d}: step {newest},", said), said[-4000:]
    from revq_ray.train.logs import committed_steps, read_step_log

    assert committed_steps(read_step_log(run_dir / "steps.log")) == list(range(1, newest + 7))
    rows = [int(r["step"]) for r in read_metrics(run_dir)]  # every log step once, none rolled back twice
    assert rows == sorted(set(rows)) and rows[-1] == newest + 6, rows
    assert sorted(p.name for p in run_dir.glob("checkpoint_step*")) == [
        f"checkpoint_step{newest:09d}",
        f"checkpoint_step{newest + 6:09d}",
    ]
    assert not (run_dir / "owner.json").exists()


@pytest.mark.slow
def test_damaged_newest_checkpoint_is_named_and_skipped(ray_local, latent_shards, tmp_path):
    """Issue 25.3: the newest checkpoint's model states truncated: the resume names the file, falls back to
    the intact checkpoint before it and says which steps are redone."""
    from revq_ray.train import run

    over = {"train.checkpoint_every": 2, "train.keep_checkpoints": 3, "train.epochs": 10}
    first = run(make_cfg(latent_shards, tmp_path, "damaged", **over, **{"train.max_steps": 6}))
    assert first.error is None, first.error
    run_dir = tmp_path / "damaged"
    assert _complete_steps(run_dir) == [2, 4, 6]
    states = sorted((run_dir / "checkpoint_step000000006").rglob("*model_states.pt"))
    assert states, list((run_dir / "checkpoint_step000000006").rglob("*"))
    data = states[0].read_bytes()
    states[0].write_bytes(data[: len(data) // 2])

    second = run(make_cfg(latent_shards, tmp_path, "damaged", **over, **{"train.max_steps": 8}))
    assert second.error is None, second.error
    starts = [int(s.split(",")[1]) for s in (run_dir / "starts.csv").read_text().split()[1:]]
    assert starts == [0, 4], starts  # fell back from the damaged 6 to 4
    steps = [int(r["step"]) for r in read_metrics(run_dir)]
    assert steps == list(range(1, 9)), steps
    assert _complete_steps(run_dir) == [4, 6, 8]  # the damaged 6 was removed, then redone whole
    import pyarrow.fs as pafs

    from revq_ray.train import checkpoint as ckpt

    redone = run_dir / "checkpoint_step000000006"  # saved again whole (its size may differ by a few bytes)
    assert ckpt.check_stored(pafs.LocalFileSystem(), str(redone)) == ""
    assert all(p.stat().st_size > len(data) // 2 for p in redone.rglob("*model_states.pt"))


def test_damaged_checkpoint_is_named_by_the_check(tmp_path):
    """The completeness check names the truncated file and both sizes; a folder without the marker (a save
    interrupted by a kill) is incomplete."""
    import pyarrow.fs as pafs

    from revq_ray.train import checkpoint as ckpt

    d = tmp_path / "run" / ckpt.dir_name(12)
    (d / "ds").mkdir(parents=True)
    (d / "ds" / "mp_rank_00_model_states.pt").write_bytes(b"x" * 1000)
    (d / ckpt.STATE_FILE).write_text("{}")
    fs = pafs.LocalFileSystem()
    assert "incomplete" in ckpt.check_stored(fs, str(d))
    ckpt.mark_complete(fs, str(d), 12)
    assert ckpt.check_stored(fs, str(d)) == ""
    (d / "ds" / "mp_rank_00_model_states.pt").write_bytes(b"x" * 10)
    problem = ckpt.check_stored(fs, str(d))
    assert "mp_rank_00_model_states.pt has 10 bytes, 1,000 when saved" in problem, problem
    _, found = ckpt.list_stored(str(tmp_path), "run")
    assert [(s.step, bool(s.problem)) for s in found] == [(12, True)]


def test_truncated_export_is_named_in_one_line(tmp_path):
    """Issue 25.3: eval / from_pretrained on an export whose model.safetensors is truncated: one line naming
    the file and the fix, not safetensors' traceback."""
    from revq_ray.core.model import ReVQModel

    model = ReVQModel([4, 2, 2], {"quantizer": {"type": "vq", "tokens": 4, "codebook_size": 16}})
    model.save_pretrained(tmp_path / "export")
    f = tmp_path / "export" / "model.safetensors"
    f.write_bytes(f.read_bytes()[:200])
    with pytest.raises(ValueError, match=rf"{re.escape(str(f))}: .*(truncated|damaged).*"):
        ReVQModel.from_pretrained(str(tmp_path / "export"))
