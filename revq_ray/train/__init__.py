"""Ray Train + DeepSpeed training of ReVQ (and VQ, SimVQ, GQ) on VAE latent shards.

    python -m revq_ray.train --config configs/debug.yaml [--set key=value ...]

Public API: :func:`build_trainer` (one ``TorchTrainer`` builder for ``train`` and ``tune``), :func:`run` and
:func:`main`. Importing this package imports neither Ray nor DeepSpeed.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

__all__ = ["build_trainer", "run", "main"]


def build_trainer(
    cfg: Any, *, storage_path: str | None = None, run_name: str | None = None, callbacks: Sequence[Any] = ()
):
    """See :func:`revq_ray.train.driver.build_trainer`."""
    from revq_ray.train.driver import build_trainer as _build

    return _build(cfg, storage_path=storage_path, run_name=run_name, callbacks=callbacks)


def run(
    cfg: Any, *, storage_path: str | None = None, run_name: str | None = None, callbacks: Sequence[Any] = ()
):
    """See :func:`revq_ray.train.driver.run`."""
    from revq_ray.train.driver import run as _run

    return _run(cfg, storage_path=storage_path, run_name=run_name, callbacks=callbacks)


def main(argv: Sequence[str] | None = None) -> int:
    """See :func:`revq_ray.train.driver.main`."""
    from revq_ray.train.driver import main as _main

    return _main(argv)
