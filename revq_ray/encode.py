"""``python -m revq_ray.encode``: media -> frozen-VAE latent shards + manifest, with Ray Data.

Examples::

    # Fashion-MNIST through the pre-trained taef2 at 64x64 (latent 32x8x8), 2 VAE actors
    python -m revq_ray.encode --input ../shared/data/fashion-mnist/train-images-idx3-ubyte.gz \\
        --vae taesd:../shared/models/taef2 --image-size 64 --output runs/latents/fmnist --num-actors 2

    # a speech folder through a built-in mel VAE, 1.5 s crops, with posterior log-variances (for GQ)
    python -m revq_ray.encode --input ../shared/data/speech16k --vae builtin:runs/vae_speech \\
        --audio-seconds 1.5 --output runs/latents/speech --logvar

Re-running the same command resumes: finished shards are kept, the rest encoded. Shards of another encode
(other inputs or settings) in ``--output`` are refused unless ``--overwrite``. Exit status 1 when nothing was
encoded or more than ``--max-skip-fraction`` of the inputs were unreadable (the manifest lists them).
Connects to a running cluster when RAY_ADDRESS is set (``ray job submit -- python -m revq_ray.encode ...``),
else starts Ray locally.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from revq_ray.runtime import MAX_SKIP_FRACTION


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m revq_ray.encode",
        description="Encode images/audio with a frozen VAE into webdataset latent shards (Ray Data).",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument(
        "--input", required=True, help="image/audio folder, IDX file, or .tar(s) of media (path or URI)"
    )
    p.add_argument("--vae", required=True, help="VAE spec: diffusers:<id|dir>, taesd:<dir> or builtin:<dir>")
    p.add_argument("--output", required=True, help="shard directory (path or URI); re-running resumes")
    p.add_argument("--limit", type=int, default=None, help="encode only the first N inputs (sorted order)")
    p.add_argument(
        "--image-size", type=int, default=None, help="image VAEs: resize inputs to SxS (default: VAE's)"
    )
    p.add_argument(
        "--resize",
        choices=["stretch", "center_crop"],
        default="stretch",
        help="image VAEs: non-square images are stretched to SxS, or center-cropped (shorter side to S, then "
        "the central SxS; how ImageNet is fed to the published ReVQ models)",
    )
    p.add_argument(
        "--audio-seconds", type=float, default=None, help="audio VAEs: crop length (default: VAE's)"
    )
    p.add_argument("--shard-size", type=int, default=1024, help="input items per shard")
    p.add_argument("--batch-size", type=int, default=64, help="VAE batch size per actor")
    p.add_argument("--num-actors", type=int, default=1, help="VAE actors (one GPU each on GPU clusters)")
    p.add_argument(
        "--cpus-per-actor", type=float, default=1.0, help="CPU actors: CPUs (and torch threads) each"
    )
    p.add_argument(
        "--logvar",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="store posterior log-variances (default: yes for Gaussian VAEs)",
    )
    p.add_argument("--dtype", choices=["float32", "float16"], default="float32", help="latent storage dtype")
    p.add_argument(
        "--device", choices=["auto", "cpu", "cuda"], default="auto", help="where the VAE actors run"
    )
    p.add_argument("--num-cpus", type=int, default=None, help="local Ray only: logical CPUs for ray.init")
    p.add_argument(
        "--overwrite",
        action="store_true",
        help="replace shards another encode (other inputs or settings) left in --output",
    )
    p.add_argument(
        "--max-skip-fraction",
        type=float,
        default=MAX_SKIP_FRACTION,
        help="exit 1 when more than this fraction of the inputs was skipped (unreadable); 1 = never",
    )
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    import math
    import os

    from revq_ray.data.encode import READER_CPUS, check_result, encode_to_shards
    from revq_ray.data.fs import check_location
    from revq_ray.runtime import init_ray

    try:  # an unusable URI fails here, in seconds, before Ray starts
        check_location(args.input)
        check_location(args.output, write=True)
    except ValueError as err:
        print(f"revq_ray.encode: error: {err}", file=sys.stderr)
        return 2

    # Joins $RAY_ADDRESS, else a local Ray sized like Ray's default (one logical CPU per core), with room for
    # a reader beside the VAE actors (without it Ray Data never schedules a read and waits forever).
    need = math.ceil(args.num_actors * args.cpus_per_actor) + READER_CPUS
    init_ray(num_cpus=args.num_cpus or max(os.cpu_count() or 1, need), include_dashboard=False)
    try:
        result = encode_to_shards(
            args.input,
            args.vae,
            args.output,
            limit=args.limit,
            image_size=args.image_size,
            resize=args.resize,
            audio_seconds=args.audio_seconds,
            shard_size=args.shard_size,
            batch_size=args.batch_size,
            num_actors=args.num_actors,
            logvar=args.logvar,
            dtype=args.dtype,
            device=args.device,
            cpus_per_actor=args.cpus_per_actor,
            overwrite=args.overwrite,
        )
    except (ValueError, FileNotFoundError) as err:
        print(f"revq_ray.encode: error: {err}", file=sys.stderr)
        return 2
    print(f"encoded: {result.summary()}")
    failed = check_result(result, args.max_skip_fraction)
    if failed:
        print(f"revq_ray.encode: error: {failed}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
