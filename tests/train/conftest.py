"""Fixtures for the training tests: real latents (Fashion-MNIST through taef2, cached) and a config helper."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parents[2]
SHARED = Path(os.environ.get("REVQ_SHARED", ROOT.parent / "shared"))
N_IMAGES = 320  # real latents encoded once and cached: about 10-20 s of taef2 on two CPU cores
CACHE = Path(os.environ.get("REVQ_TEST_CACHE", Path(tempfile.gettempdir()) / "revq_ray_test_cache"))


def _encode_fmnist(out: Path) -> None:
    import ray

    from revq_ray.data.encode import encode_to_shards

    started = False
    if not ray.is_initialized():
        ray.init(
            address="local", num_cpus=8, include_dashboard=False, log_to_driver=False, configure_logging=False
        )
        started = True
    try:
        encode_to_shards(
            str(SHARED / "data" / "fashion-mnist" / "train-images-idx3-ubyte.gz"),
            f"taesd:{SHARED / 'models' / 'taef2'}",
            str(out),
            limit=N_IMAGES,
            image_size=64,
            shard_size=80,
            batch_size=64,
            progress=False,
        )
    finally:
        if started:
            ray.shutdown()


@pytest.fixture(scope="session")
def latent_shards() -> Path:
    """Shards of real latents (32, 8, 8): Fashion-MNIST images through the pre-trained taef2 encoder, encoded
    once and cached under $REVQ_TEST_CACHE. Without ../shared: synthetic latents of the same shape."""
    if (SHARED / "models" / "taef2").is_dir() and (SHARED / "data" / "fashion-mnist").is_dir():
        out = CACHE / f"fmnist_taef2_{N_IMAGES}"
        if not (out / "manifest.json").is_file():
            _encode_fmnist(out)
        return out
    from revq_ray.data.synthetic import write_synthetic_shards

    out = CACHE / f"synthetic_{N_IMAGES}"
    if not (out / "manifest.json").is_file():
        write_synthetic_shards(out, N_IMAGES, (32, 8, 8), shard_size=80, seed=0)
    return out


def make_cfg(shards: Path, out: Path, name: str, **overrides: Any):
    """configs/debug.yaml sized for the test latents, plus ``section.key=value`` overrides."""
    from revq_ray.config import load_config

    base = {
        "name": name,
        "output_dir": str(out),
        "data.shards": str(shards),
        "data.val_items": 48,
        "data.shuffle_buffer": 64,
        "model.quantizer.tokens": 512,
        "model.quantizer.codebook_size": 32,
        "model.rectifier.width": 32,
        "model.rectifier.head_dim": 16,
        "train.batch_size": 32,
        "train.log_every": 1,
        "train.cpus_per_worker": 0.5,
        "train.max_failures": 0,  # a bug should fail the test, not retry it
    }
    base.update(overrides)
    return load_config(ROOT / "configs" / "debug.yaml", [f"{k}={v}" for k, v in base.items()])


def read_metrics(run_dir: Path) -> list[dict[str, str]]:
    import csv

    with open(run_dir / "metrics.csv", newline="") as f:
        return list(csv.DictReader(f))
