"""`ray start --head` + `ray job submit -- python -m revq_ray.train --config configs/debug.yaml`: the job
joins the running cluster (RAY_ADDRESS), writes synthetic debug shards where none are, trains, and SUCCEEDS.

The head runs in its own temp dir on free ports with token auth (RAY_AUTH_MODE=token, a token made for this
test); teardown stops only the processes of this head (found by its temp dir), never a blanket `ray stop`, so
other Ray instances on the machine are untouched.
"""

from __future__ import annotations

import contextlib
import csv
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

pytestmark = [pytest.mark.cluster, pytest.mark.slow]

ROOT = Path(__file__).resolve().parents[2]
RAY = str(Path(sys.executable).with_name("ray"))


def _free_ports(n: int) -> list[int]:
    socks = []
    for _ in range(n):
        s = socket.socket()
        s.bind(("127.0.0.1", 0))
        socks.append(s)
    ports = [s.getsockname()[1] for s in socks]
    for s in socks:
        s.close()
    return ports


def _kill_head(temp_dir: str) -> None:
    """SIGTERM (then SIGKILL) every process whose command line names our temp dir, and their children."""
    import psutil

    procs: dict[int, psutil.Process] = {}
    for p in psutil.process_iter(["cmdline"]):
        with contextlib.suppress(psutil.NoSuchProcess, psutil.AccessDenied):
            if any(temp_dir in part for part in p.info["cmdline"] or []):
                procs[p.pid] = p
                procs.update({c.pid: c for c in p.children(recursive=True)})
    for p in procs.values():
        with contextlib.suppress(psutil.NoSuchProcess):
            p.send_signal(signal.SIGTERM)
    _, alive = psutil.wait_procs(list(procs.values()), timeout=15)
    for p in alive:
        with contextlib.suppress(psutil.NoSuchProcess):
            p.kill()


@pytest.fixture
def ray_head():
    temp_dir = tempfile.mkdtemp(prefix="rqtrain", dir="/tmp")  # short: Ray's unix sockets live under it
    gcs, dash, client, agent, agent_grpc, metrics, rt_env, nm, om = _free_ports(9)
    env = dict(
        os.environ,
        RAY_AUTH_MODE="token",
        RAY_AUTH_TOKEN=secrets.token_hex(32),
        DS_ACCELERATOR="cpu",
        OMP_NUM_THREADS="1",
        # The job's `python` is this venv's.
        PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
    )
    env.pop("RAY_ADDRESS", None)
    cmd = [
        RAY, "start", "--head", f"--port={gcs}", f"--temp-dir={temp_dir}",
        "--dashboard-host=127.0.0.1", f"--dashboard-port={dash}", f"--ray-client-server-port={client}",
        f"--dashboard-agent-listen-port={agent}", f"--dashboard-agent-grpc-port={agent_grpc}",
        f"--metrics-export-port={metrics}", f"--runtime-env-agent-port={rt_env}",
        f"--node-manager-port={nm}", f"--object-manager-port={om}", "--num-cpus=4", "--disable-usage-stats",
    ]  # fmt: skip
    try:
        started = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=180)
        assert started.returncode == 0, started.stdout[-3000:] + started.stderr[-3000:]
        yield f"http://127.0.0.1:{dash}", env
    finally:
        _kill_head(temp_dir)
        shutil.rmtree(temp_dir, ignore_errors=True)


def test_debug_preset_runs_as_a_ray_job(ray_head, tmp_path):
    address, env = ray_head
    deadline = time.time() + 90
    while subprocess.run([RAY, "job", "list", "--address", address], env=env, capture_output=True).returncode:
        assert time.time() < deadline, "the job API of the new head did not come up"
        time.sleep(1)
    shards, out = tmp_path / "shards", tmp_path / "runs"
    job = subprocess.run(
        [
            RAY, "job", "submit", "--address", address, "--working-dir", str(ROOT), "--",
            "python", "-m", "revq_ray.train", "--config", "configs/debug.yaml",
            "--set", f"data.shards={shards}", "--set", f"output_dir={out}", "--set", "name=job",
            "--set", "train.epochs=1", "--set", "train.synthetic_items=384", "--set", "data.val_items=32",
        ],
        env=env, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    logs = job.stdout[-5000:] + job.stderr[-3000:]
    assert job.returncode == 0, logs
    assert "SUCCEEDED" in job.stdout + job.stderr, logs
    assert "joined Ray cluster" in logs and "writing 384 synthetic latents" in logs, logs
    assert (shards / "manifest.json").is_file()
    run_dir = out / "job"
    with open(run_dir / "metrics.csv") as f:
        rows = list(csv.DictReader(f))
    assert rows and rows[-1]["val_mse"], rows
    assert (run_dir / "export" / "latest" / "model.safetensors").is_file()
