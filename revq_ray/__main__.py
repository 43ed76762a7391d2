"""``python -m revq_ray <command> ...``: the same as the ``revq-ray`` console script."""

import sys

from revq_ray.cli import main

if __name__ == "__main__":
    sys.exit(main())
