"""Evaluation: metrics and reports for a trained tokenizer, and the :class:`Tokenizer` (media <-> ids).

``python -m revq_ray.eval --model DIR --input PATH --output DIR`` (see :mod:`revq_ray.eval.evaluate`).
"""

from __future__ import annotations

from revq_ray.eval.evaluate import evaluate, main
from revq_ray.tokenizer import Tokenizer

# Imported eagerly, not wrapped: importing the submodule ``revq_ray.eval.evaluate`` anywhere would otherwise
# rebind the package attribute ``evaluate`` to that module, and ``from revq_ray.eval import evaluate`` would
# then return the module instead of the function.
__all__ = ["Tokenizer", "evaluate", "main"]
