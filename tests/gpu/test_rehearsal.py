"""The GPU check rehearsed on the CPU (benchmarks/gpu_rehearsal.sh): a bare Python 3.12 environment with only
what a GPU image holds, the wheel folder of benchmarks/gpu_wheels.sh installed offline, and every part of
benchmarks/gpu_check.sh run at tiny shapes with the network cut off. Catches a missing wheel or a line only
Python 3.11 accepts before a GPU machine is paid for.

``extended``: the first run makes the image environment and the wheel folder from PyPI (minutes, a few GB
of torch); later runs reuse both and take about 3-4 minutes on 2 shared cores."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

pytestmark = [pytest.mark.extended, pytest.mark.timeout(3600)]

ROOT = Path(__file__).resolve().parents[2]


def test_gpu_check_rehearsal_on_a_bare_python312():
    out = ROOT / "runs" / "gpu_check_cpu.json"
    out.unlink(missing_ok=True)
    p = subprocess.run(
        ["bash", "benchmarks/gpu_rehearsal.sh"], cwd=ROOT, capture_output=True, text=True, timeout=3500
    )
    log = p.stdout + p.stderr
    if p.returncode == 2 and "no Python 3.12 found" in p.stderr:
        pytest.skip(p.stderr.strip())
    assert p.returncode == 0, log[-6000:]
    res = json.loads(out.read_text())
    parts = res["parts"]
    assert list(parts) == ["env", "ids", "step", "memory", "ray"] and res["ok"], log[-6000:]
    env = parts["env"]
    assert env["python"].startswith("3.12.")
    # ray, deepspeed and pydantic came from the wheel folder's install, not from the image
    for name in ("ray", "deepspeed", "pydantic"):
        assert env[name]["from"].endswith(".gl/site-py3.12"), env[name]
    assert env["ray"]["version"] == "2.60.0" and env["deepspeed"]["version"] == "0.19.8"
    assert parts["ids"]["ok"] and parts["ids"]["512T"]["equal"] and parts["ids"]["256T-L"]["equal"]
    assert set(parts["step"]["results"]) == {"512T", "256T-B", "256T-L"}
    ray_part = parts["ray"]
    assert [ray_part["fresh"]["steps"], ray_part["resumed"]["steps"]] == [10, 20]
    assert ray_part["fresh"]["placement"] == [["cpu", "cpu"]]
    # the table names itself a rehearsal: nobody can take its figures for a GPU's
    assert "CPU REHEARSAL" in p.stdout and "all parts passed" in p.stdout
    # init_ray(include_dashboard=True) met a Ray without its dashboard packages, and started anyway
    assert ray_part["dashboard_missing"], "the image environment has the dashboard's packages"
