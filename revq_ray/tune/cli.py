"""``python -m revq_ray.tune`` / ``revq-ray tune``: load and validate a tuning preset, then run its sweep."""

from __future__ import annotations

import argparse
import sys

from revq_ray.config import ConfigError
from revq_ray.runtime import add_set_argument, init_ray
from revq_ray.tune.config import dump_tune_config, load_tune_config
from revq_ray.tune.sweep import run_sweep, sweep_dir_of


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m revq_ray.tune",
        description="Hyperparameter search over revq-ray training (Ray Tune: Optuna + ASHA, one Train run "
        "per trial). Re-running the same command resumes an interrupted sweep.",
    )
    parser.add_argument("--config", required=True, help="tuning preset, e.g. tuning/debug.yaml")
    add_set_argument(parser, help="override a tuning-preset field, e.g. --set num_samples=16 (repeatable)")
    add_set_argument(
        parser,
        help="override a field of the base training preset for every trial, e.g. "
        "--train-set data.shards=s3://... (repeatable)",
        flag="--train-set",
        dest="train_overrides",
    )
    parser.add_argument(
        "--address", default=None, help="Ray address (default: RAY_ADDRESS, else a local Ray)"
    )
    parser.add_argument(
        "--num-cpus", type=int, default=None, help="logical CPUs of a local Ray (default: max(8, cores))"
    )
    parser.add_argument(
        "--restart-errored", action="store_true", help="on resume, re-run trials that errored"
    )
    parser.add_argument("--dry-run", action="store_true", help="validate and print the space, run nothing")
    return parser


def main(argv: list[str] | None = None) -> int:
    """``python -m revq_ray.tune``; returns the exit code (1 when no trial reported the metric)."""
    args = build_parser().parse_args(argv)
    from revq_ray.data.fs import check_location

    try:
        # an unusable output URI fails in seconds, before Ray starts
        tcfg = load_tune_config(args.config, args.overrides, train_overrides=args.train_overrides)
        check_location(tcfg.output_dir, write=True)
    except (ConfigError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    if args.dry_run:
        print(dump_tune_config(tcfg))
        print(f"sweep directory: {sweep_dir_of(tcfg)}")
        return 0

    # The same start-up as revq_ray.train: join a cluster, or a local Ray with logical CPUs above the core
    # count (with only "cores" of them, concurrent trials' workers and Ray Data starve each other).
    init_ray(args.address, num_cpus=args.num_cpus)
    try:
        out = run_sweep(tcfg, restart_errored=args.restart_errored)
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0 if out["best"] is not None else 1
