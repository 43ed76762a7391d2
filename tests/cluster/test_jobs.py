"""Ray jobs on a real `ray start --head` with token auth on, as users submit them:

- `ray job submit -- python -m revq_ray.train --config configs/debug.yaml`: the job's driver joins the running
  cluster (RAY_ADDRESS), writes synthetic debug shards where none are, trains, and succeeds;
- `ray job submit -- python -m revq_ray.tune --config tuning/debug.yaml` runs the sweep to completion;
- without the token the job API refuses the client.

One head serves the module (a head costs ~20 s to start and stop on 2 cores). It gets its own temp dir and
free ports (other Ray instances on the machine are untouched) and RAY_AUTH_MODE=token with a token made for
this test. Teardown stops only the processes this head started (found by its unique temp dir), never
`ray stop`.
"""

from __future__ import annotations

import contextlib
import csv
import os
import re
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

from revq_ray.runtime import extensions_dir

# Minutes on an idle 2-core machine; far more when other Ray jobs share the cores.
pytestmark = [pytest.mark.cluster, pytest.mark.slow, pytest.mark.timeout(2400)]

ROOT = Path(__file__).resolve().parents[2]
RAY = str(Path(sys.executable).with_name("ray"))


def _free_ports(n: int) -> list[int]:
    socks, ports = [], []
    for _ in range(n):
        s = socket.socket()
        s.bind(("127.0.0.1", 0))
        socks.append(s)
        ports.append(s.getsockname()[1])
    for s in socks:
        s.close()
    return ports


def _own_processes(marker: str) -> list:
    """Processes whose command line names our head's temp dir, plus all their descendants."""
    import psutil

    roots = []
    for p in psutil.process_iter(["cmdline"]):
        try:
            if any(marker in part for part in (p.info["cmdline"] or [])):
                roots.append(p)
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
    out = {p.pid: p for p in roots}
    for p in roots:
        try:
            out.update({c.pid: c for c in p.children(recursive=True)})
        except psutil.NoSuchProcess:
            continue
    return list(out.values())


def _stop_head(marker: str) -> None:
    import psutil

    procs = _own_processes(marker)
    for p in procs:
        with contextlib.suppress(psutil.NoSuchProcess):
            p.send_signal(signal.SIGTERM)
    _, alive = psutil.wait_procs(procs, timeout=15)
    for p in alive:
        with contextlib.suppress(psutil.NoSuchProcess):
            p.kill()


@pytest.fixture(scope="module")
def ray_head():
    # Short path: Ray's unix sockets live under the temp dir (108-byte limit).
    temp_dir = tempfile.mkdtemp(prefix="rqjob", dir="/tmp")
    gcs, dash, client, agent, agent_grpc, metrics, rt_env, nm, om = _free_ports(9)
    token = secrets.token_hex(32)
    env = dict(
        os.environ,
        RAY_AUTH_MODE="token",
        RAY_AUTH_TOKEN=token,
        RAY_DEDUP_LOGS="0",
        RAY_raylet_start_wait_time_s="180",  # a loaded machine needs more than Ray's default minute
        DS_ACCELERATOR="cpu",
        OMP_NUM_THREADS="1",
        TORCH_EXTENSIONS_DIR=str(extensions_dir()),
        # Job drivers launched by this head find the venv's python and ray first.
        PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
    )
    env.pop("RAY_ADDRESS", None)
    cmd = [
        RAY, "start", "--head",
        f"--port={gcs}", f"--temp-dir={temp_dir}",
        "--dashboard-host=127.0.0.1", f"--dashboard-port={dash}",
        f"--ray-client-server-port={client}",
        f"--dashboard-agent-listen-port={agent}", f"--dashboard-agent-grpc-port={agent_grpc}",
        f"--metrics-export-port={metrics}", f"--runtime-env-agent-port={rt_env}",
        f"--node-manager-port={nm}", f"--object-manager-port={om}",
        "--num-cpus=8", "--disable-usage-stats",
    ]  # fmt: skip
    started = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=180)
    try:
        assert started.returncode == 0, started.stdout[-3000:] + started.stderr[-3000:]
        yield {"address": f"http://127.0.0.1:{dash}", "env": env, "temp_dir": temp_dir}
    finally:
        _stop_head(temp_dir)
        shutil.rmtree(temp_dir, ignore_errors=True)


def _wait_for_dashboard(address: str, env: dict, timeout: float = 60) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        r = subprocess.run(
            [RAY, "job", "list", "--address", address], env=env, capture_output=True, text=True
        )
        if r.returncode == 0:
            return
        time.sleep(1)
    raise AssertionError(f"job API at {address} not ready: {r.stdout[-2000:]} {r.stderr[-2000:]}")


def test_train_debug_preset_runs_as_a_job(ray_head, tmp_path):
    address, env = ray_head["address"], ray_head["env"]
    _wait_for_dashboard(address, env)
    out = tmp_path / "runs"  # the debug preset's data.shards: synthetic, written under it
    job = subprocess.run(
        [
            RAY, "job", "submit", "--address", address, "--working-dir", str(ROOT), "--",
            "python", "-m", "revq_ray.train", "--config", "configs/debug.yaml",
            "--set", f"output_dir={out}", "--set", "name=job",
            "--set", "train.epochs=1", "--set", "train.synthetic_items=384", "--set", "data.val_items=32",
        ],
        env=env, capture_output=True, text=True, timeout=900,
    )  # fmt: skip
    logs = job.stdout[-5000:] + job.stderr[-3000:]
    assert job.returncode == 0, logs
    assert re.search(r"Job '\S+' succeeded", re.sub(r"\x1b\[[0-9;]*m", "", job.stdout + job.stderr)), logs
    said = job.stdout + job.stderr  # the whole log: `logs` is only its tail
    assert "joined Ray cluster" in said and "writing 384 synthetic latents" in said, logs
    assert (out / "synthetic" / "384x16x8x8-seed0" / "manifest.json").is_file()
    run_dir = out / "job"
    with open(run_dir / "metrics.csv") as f:
        rows = list(csv.DictReader(f))
    assert rows and rows[-1]["val_mse"], rows
    assert (run_dir / "export" / "latest" / "model.safetensors").is_file()


def test_tune_debug_runs_as_a_job_with_token_auth(ray_head, tmp_path):
    from revq_ray.config import load_config
    from revq_ray.data.synthetic import write_synthetic_shards

    address, env = ray_head["address"], ray_head["env"]
    _wait_for_dashboard(address, env)

    # No token, no service: the job API rejects an unauthenticated client.
    anon = {
        k: v for k, v in env.items() if k not in ("RAY_AUTH_MODE", "RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH")
    }
    anon["RAY_AUTH_MODE"] = "disabled"
    anon["HOME"] = str(tmp_path)  # no ~/.ray/auth_token to fall back on
    refused = subprocess.run(
        [RAY, "job", "list", "--address", address], env=anon, capture_output=True, text=True
    )
    assert refused.returncode != 0, refused.stdout
    said = refused.stdout + refused.stderr
    assert re.search(r"401|unauthori[sz]ed|authenticat|token", said, re.I), said[-2000:]

    shape = load_config(ROOT / "configs" / "debug.yaml").train.synthetic_latent_shape
    shards = tmp_path / "latents"
    write_synthetic_shards(shards, 384, tuple(shape), shard_size=128, seed=2)
    out = tmp_path / "sweeps"
    t0 = time.time()
    job = subprocess.run(
        [
            RAY, "job", "submit", "--address", address, "--working-dir", str(ROOT),
            "--", "python", "-m", "revq_ray.tune", "--config", "tuning/debug.yaml",
            # One trial of one epoch keeps the job short: the job path is under test; tests/tune runs sweeps.
            "--set", "num_samples=1", "--set", "asha.max_t=1",
            "--set", f"output_dir={out}", "--train-set", f"data.shards={shards}",
        ],
        env=env, capture_output=True, text=True, timeout=1500,
    )  # fmt: skip
    print(f"job took {time.time() - t0:.1f}s")
    logs = job.stdout[-4000:] + job.stderr[-4000:]
    assert job.returncode == 0, logs
    assert re.search(r"Job '\S+' succeeded", re.sub(r"\x1b\[[0-9;]*m", "", job.stdout + job.stderr)), logs
    with open(out / "debug" / "results.csv") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 1 and all(r["status"] != "error" for r in rows), rows
    assert (out / "debug" / "best.yaml").is_file() and (out / "debug" / "sweep.png").is_file()
