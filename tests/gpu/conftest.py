"""The GPU tier (``pytest -m gpu``): skipped with a reason where CUDA is absent; never needed by the default
run. ``benchmarks/gpu_check.sh`` runs it first whenever a GPU is at hand."""

from __future__ import annotations

import pytest
import torch


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs CUDA (no GPU on this machine): run `pytest -m gpu` on a GPU host")
    for item in items:
        # The marker, not ``"gpu" in item.keywords``: keywords also hold the names of the item's parents, so
        # that matched every test under tests/gpu/, the CPU rehearsal (test_rehearsal.py) included.
        if item.get_closest_marker("gpu") is not None:
            item.add_marker(skip)


@pytest.fixture
def gpus() -> int:
    return torch.cuda.device_count()
