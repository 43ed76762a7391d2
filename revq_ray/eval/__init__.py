"""Evaluation: metrics and reports for a trained tokenizer, and the :class:`Tokenizer` (media <-> ids).

``python -m revq_ray.eval --model DIR --input PATH --output DIR`` (see :mod:`revq_ray.eval.evaluate`).
"""

from __future__ import annotations

from typing import Any

from revq_ray.tokenizer import Tokenizer

__all__ = ["Tokenizer", "evaluate", "main"]


def evaluate(*args: Any, **kwargs: Any) -> dict[str, Any]:
    """See :func:`revq_ray.eval.evaluate.evaluate`."""
    from revq_ray.eval.evaluate import evaluate as _evaluate

    return _evaluate(*args, **kwargs)


def main(argv: list[str] | None = None) -> int:
    """``revq-ray eval``: see :func:`revq_ray.eval.evaluate.main`."""
    from revq_ray.eval.evaluate import main as _main

    return _main(argv)
