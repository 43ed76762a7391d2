"""``python -m revq_ray.vae --config configs/vae_fashion_mnist.yaml [--set key=value ...]``: train a built-in
Gaussian VAE (see :mod:`revq_ray.vae.train`) and save it for ``builtin:<output>``."""

from __future__ import annotations

import argparse
import sys

from revq_ray.config import ConfigError, dump_config, load_config
from revq_ray.runtime import add_set_argument


def main(argv: list[str] | None = None) -> int:
    from revq_ray.vae.train import VAETrainConfig, train_vae

    parser = argparse.ArgumentParser(prog="python -m revq_ray.vae", description=__doc__)
    parser.add_argument("--config", required=True, help="a VAE training preset, e.g. configs/vae_speech.yaml")
    add_set_argument(
        parser, help="override a config field (repeatable), e.g. --set steps=100 --set input=/data/images"
    )
    parser.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
    args = parser.parse_args(argv)
    try:
        cfg = load_config(args.config, args.overrides, cls=VAETrainConfig)
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    if args.print_config:
        print(dump_config(cfg), end="")
        return 0
    try:
        train_vae(cfg)
    except (FileNotFoundError, ValueError, ImportError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
