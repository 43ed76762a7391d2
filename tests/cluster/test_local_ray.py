"""What a local Ray started by :func:`revq_ray.runtime.init_ray` really exposes (its docstring says the same):
it advertises the address Ray picks (not loopback), its dashboard listens on 127.0.0.1 only, and a client
without the token is refused by its gRPC port, which listens on every interface."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytestmark = pytest.mark.cluster

ROOT = Path(__file__).resolve().parents[2]

SERVER = """
import json, sys, ray
from revq_ray.runtime import init_ray
init_ray(num_cpus=2)
node = ray._private.worker.global_worker.node
info = {"advertised": ray.nodes()[0]["NodeManagerAddress"], "picked": ray.util.get_node_ip_address(),
        "dashboard": node.address_info.get("webui_url"), "gcs": node.gcs_address}
print(json.dumps(info), flush=True)
sys.stdin.read()  # until the test closes stdin
ray.shutdown()
"""


def test_local_ray_advertises_what_the_docstring_says_and_refuses_a_client_without_the_token(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    srv = subprocess.Popen(
        [sys.executable, "-c", SERVER], stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        text=True, env=env, cwd=tmp_path,
    )  # fmt: skip
    try:
        line = srv.stdout.readline()
        assert line, srv.stderr.read()[-3000:]
        info = json.loads(line)
        assert info["advertised"] == info["picked"]  # Ray's own pick, whatever _node_ip_address said
        assert info["dashboard"].startswith("127.0.0.1:")  # job API and dashboard: loopback only
        # A client with no token (another HOME: no ~/.ray/auth_token to fall back on) is refused.
        anon = {**env, "HOME": str(tmp_path)}
        anon.pop("RAY_AUTH_TOKEN", None)
        t0 = time.time()
        client = subprocess.run(
            [sys.executable, "-c", f"import ray; ray.init(address={info['gcs']!r}); print('CONNECTED')"],
            capture_output=True, text=True, env=anon, timeout=120, cwd=tmp_path,
        )  # fmt: skip
        assert client.returncode != 0 and "CONNECTED" not in client.stdout, client.stdout[-2000:]
        assert "Failed to connect" in client.stderr or "uthenticat" in client.stderr, client.stderr[-2000:]
        assert time.time() - t0 < 110
    finally:
        srv.stdin.close()
        try:
            srv.wait(timeout=60)
        except subprocess.TimeoutExpired:
            srv.kill()
