"""``python -m revq_ray.eval --model DIR --input PATH --output DIR [--vae SPEC] [--limit N]``."""

import sys

from revq_ray.eval.evaluate import main

if __name__ == "__main__":
    sys.exit(main())
