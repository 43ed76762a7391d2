"""``python -m revq_ray.prior --config configs/prior_<preset>.yaml [--set key=value ...]``."""

import sys

from revq_ray.prior.driver import main

if __name__ == "__main__":
    sys.exit(main())
