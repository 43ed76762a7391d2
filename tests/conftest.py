"""Shared fixtures. Tiers are pytest markers (see pyproject.toml); CI runs them all."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import pytest

from revq_ray.runtime import extensions_dir

ROOT = Path(__file__).resolve().parents[1]
# ../shared beside the checkout (CI has it, a user's clone does not). REVQ_SHARED overrides.
SHARED = Path(os.environ.get("REVQ_SHARED", ROOT.parent / "shared"))

# DeepSpeed on a machine without a GPU, and one cache for its JIT-compiled ops across test runs.
os.environ.setdefault("DS_ACCELERATOR", "cpu")
os.environ.setdefault("TORCH_EXTENSIONS_DIR", str(extensions_dir()))  # one per Python + torch version
os.environ.setdefault("RAY_DEDUP_LOGS", "0")
os.environ.setdefault("RAY_TRAIN_V2_ENABLED", "1")
os.environ.setdefault("OMP_NUM_THREADS", "1")
# No test downloads anything: metric weights (rFID/LPIPS) are never fetched, and the user's torch hub cache
# is swapped for an empty one, so evals score the same (metrics absent, noted) on every machine. Tests that
# exercise the metrics build their own weights (tests/eval/test_perceptual.py).
os.environ["REVQ_OFFLINE"] = "1"
os.environ["TORCH_HOME"] = str(Path(tempfile.gettempdir()) / "revq_ray_tests_torch_home")


@pytest.fixture(scope="session")
def shared_dir() -> Path:
    """The ../shared assets; tests that need them skip with a reason when they are missing."""
    if not (SHARED / "README.md").is_file():
        pytest.skip(
            f"../shared assets not found at {SHARED} (present in CI; set REVQ_SHARED to point at them)"
        )
    return SHARED


@pytest.fixture(scope="module")
def ray_local():
    """A real local Ray instance for one test module (logical CPUs above the core count so Data and Train
    can share two cores), shut down afterwards so cluster tests can start their own."""
    import ray

    if ray.is_initialized():
        ray.shutdown()
    ray.init(
        address="local", num_cpus=8, include_dashboard=False, log_to_driver=False, configure_logging=False
    )
    yield ray
    ray.shutdown()
