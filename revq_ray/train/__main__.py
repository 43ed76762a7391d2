"""``python -m revq_ray.train --config configs/<preset>.yaml [--set key=value ...]``."""

import sys

from revq_ray.train.driver import main

if __name__ == "__main__":
    sys.exit(main())
