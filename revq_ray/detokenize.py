"""``revq-ray detokenize`` / ``python -m revq_ray.detokenize``: token ids -> media (see revq_ray.tokenize)."""

from __future__ import annotations

import sys

from revq_ray.tokenize import detokenize_main as main

__all__ = ["main"]

if __name__ == "__main__":
    sys.exit(main())
