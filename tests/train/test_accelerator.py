"""GPU workers get DeepSpeed's CUDA accelerator whatever the driver's environment says, a mismatch between
the model's device and DeepSpeed's accelerator stops a run early, and ``init_ray`` starts without the
dashboard where its packages are missing (a minimal Ray, as on a bare GPU image)."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from revq_ray.config import load_config
from revq_ray.train.driver import worker_env

pytestmark = pytest.mark.train

ROOT = Path(__file__).resolve().parents[2]


def _cfg(use_gpu: bool):
    return load_config(ROOT / "configs" / "debug.yaml", [f"train.use_gpu={str(use_gpu).lower()}"])


def test_gpu_workers_get_the_cuda_accelerator_whatever_the_driver_says(ray_local, monkeypatch):
    """The driver says DS_ACCELERATOR=cpu (tests/conftest.py does, for the CPU tiers); a local Ray hands
    the driver's environment to its workers, so a GPU run's workers must be told cuda explicitly. Checked
    in a real Ray worker started with the trainer's runtime_env."""
    monkeypatch.setenv("DS_ACCELERATOR", "cpu")
    assert worker_env(_cfg(use_gpu=True))["DS_ACCELERATOR"] == "cuda"
    assert worker_env(_cfg(use_gpu=False))["DS_ACCELERATOR"] == "cpu"

    @ray_local.remote(num_cpus=1)
    def seen() -> str | None:
        return os.environ.get("DS_ACCELERATOR")

    gpu_env = {"env_vars": worker_env(_cfg(use_gpu=True))}
    assert ray_local.get(seen.options(runtime_env=gpu_env).remote(), timeout=300) == "cuda"
    assert ray_local.get(seen.remote(), timeout=300) == "cpu"  # the leak the line above guards against


def test_accelerator_mismatch_is_a_clear_error():
    from revq_ray.train.loop import check_accelerator

    check_accelerator(torch.device("cpu"), "cpu")
    check_accelerator(torch.device("cuda", 0), "cuda")
    with pytest.raises(RuntimeError, match=r"is .cpu. but the model is on cuda:0.*DS_ACCELERATOR"):
        check_accelerator(torch.device("cuda", 0), "cpu")


def test_init_ray_starts_without_a_dashboard_when_its_packages_are_missing(tmp_path):
    """A fresh interpreter in which the dashboard's packages cannot be imported (a minimal Ray: the
    import of aiohttp fails, as where it is not installed): init_ray(include_dashboard=True) starts a real
    local Ray, says why there is no dashboard, and runs a task."""
    code = textwrap.dedent(
        """
        import importlib.abc, logging, sys

        class Absent(importlib.abc.MetaPathFinder):
            def find_spec(self, name, path=None, target=None):
                if name.split(".")[0] in ("aiohttp", "aiohttp_cors"):
                    raise ImportError(f"No module named {name!r} (hidden by the test)")
                return None

        sys.meta_path.insert(0, Absent())
        logging.basicConfig(level=logging.INFO)
        import ray
        from revq_ray.runtime import init_ray

        init_ray(num_cpus=2, include_dashboard=True)
        try:
            assert ray.get(ray.remote(lambda: 41 + 1).remote(), timeout=300) == 42
        finally:
            ray.shutdown()
        from revq_ray.runtime import dashboard_missing

        assert "aiohttp" in (dashboard_missing() or ""), dashboard_missing()
        print("STARTED-WITHOUT-DASHBOARD")
        """
    )
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    p = subprocess.run(
        [sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600
    )
    out = p.stdout + p.stderr
    assert p.returncode == 0 and "STARTED-WITHOUT-DASHBOARD" in p.stdout, out[-4000:]
    assert "starting Ray without its dashboard" in out and "aiohttp" in out, out[-4000:]


def test_jit_ops_are_cached_per_python_and_torch(monkeypatch):
    """A DeepSpeed op built by one Python (or torch) does not load into another, and torch reuses what it
    finds under an explicit TORCH_EXTENSIONS_DIR: the default folder names both, so 3.11 and 3.12
    environments on one machine never share a build."""
    from importlib.metadata import version

    from revq_ray.runtime import extensions_dir

    monkeypatch.delenv("TORCH_EXTENSIONS_DIR", raising=False)
    tag = f"py{sys.version_info[0]}{sys.version_info[1]}_torch{version('torch')}"
    assert extensions_dir().name == tag and extensions_dir().parent.name == "torch_extensions"
    assert worker_env(_cfg(use_gpu=False))["TORCH_EXTENSIONS_DIR"].endswith(tag)
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", "/somewhere/else")
    assert worker_env(_cfg(use_gpu=False))["TORCH_EXTENSIONS_DIR"] == "/somewhere/else"
