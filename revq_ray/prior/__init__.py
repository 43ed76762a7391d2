"""Stage 2: a class-conditional transformer prior on a tokenizer's ids, trained with Ray Train + DeepSpeed.

    python -m revq_ray.prior --config configs/prior_fashion_mnist.yaml [--set key=value ...]
    revq-ray sample --prior runs/prior_fashion_mnist --tokenizer TOKENIZER --classes 0,1 --n 8 --output DIR

- :mod:`revq_ray.prior.model`: :class:`PriorTransformer`, plain PyTorch (imports without Ray, DeepSpeed or
  pydantic): per-position codebooks, the class prefix, classifier-free guidance, KV-cache sampling.
- :mod:`revq_ray.prior.data`: a ``revq-ray tokenize`` dataset read and checked for the prior.
- :mod:`revq_ray.prior.config`, :mod:`~revq_ray.prior.driver`, :mod:`~revq_ray.prior.loop`: training, on the
  tokenizer trainer's machinery (revq_ray.train: DeepSpeed engine, Checkpointer, Schedule, Reporter,
  run lock).
- :mod:`revq_ray.prior.sampling`: :func:`load_prior`, :func:`sample` (ids), :func:`evaluate_nll` (a token
  dataset's cross-entropy under the prior) and ``revq-ray sample`` (images).

Importing this package imports neither torch, Ray nor DeepSpeed; the names below load on first use.
"""

from __future__ import annotations

from typing import Any

__all__ = ["PriorTransformer", "PriorSpec", "load_prior", "sample", "evaluate_nll", "train", "main"]


def __getattr__(name: str) -> Any:
    if name in ("PriorTransformer", "PriorSpec"):
        from revq_ray.prior import model

        return getattr(model, name)
    if name in ("load_prior", "sample", "evaluate_nll"):
        from revq_ray.prior import sampling as _sample

        return getattr(_sample, name)
    raise AttributeError(f"module 'revq_ray.prior' has no attribute {name!r}")


def train(cfg: Any, **kw: Any) -> Any:
    """Train (or resume) the prior run ``cfg`` (a PriorRunConfig); see :func:`revq_ray.prior.driver.run`."""
    from revq_ray.prior.driver import run

    return run(cfg, **kw)


def main(argv: Any = None) -> int:
    """``python -m revq_ray.prior``; see :func:`revq_ray.prior.driver.main`."""
    from revq_ray.prior.driver import main as _main

    return _main(argv)
