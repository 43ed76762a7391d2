"""``revq-ray import-revq`` and ``revq-ray export-revq``: argument parsing around :mod:`.convert`."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from revq_ray.published.convert import (
    DCAE_VAE_SPEC,
    HUB_MODELS,
    PublishedFormatError,
    export_revq,
    import_revq,
)


def import_main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="revq-ray import-revq",
        description="Convert a published ReVQ tokenizer (the authors' ckpt.pth + yaml) into a revq-ray "
        "Tokenizer bundle (tokenizer.json + model/ in safetensors). The pickle is read with "
        "torch.load(weights_only=True).",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument(
        "source",
        nargs="?",
        default=None,
        help=f"local snapshot directory or hub repo id ({', '.join(HUB_MODELS)} are short for "
        f"{', '.join(HUB_MODELS.values())}); or give --checkpoint and --config",
    )
    p.add_argument("--checkpoint", help="the authors' ckpt.pth")
    p.add_argument("--config", help="the authors' yaml (512T_NC=16384.yaml in every published repo)")
    p.add_argument("--stats", help="latent statistics (safetensors with mean and std of one latent's values)")
    p.add_argument("--output", required=True, help="directory for the Tokenizer bundle")
    p.add_argument("--vae", default=DCAE_VAE_SPEC, help="VAE spec stored in the bundle")
    p.add_argument("--revision", default=None, help="hub revision (hub repo ids only)")
    args = p.parse_args(argv)
    try:
        out = import_revq(
            args.output, args.source, checkpoint=args.checkpoint, config=args.config, stats=args.stats,
            vae_spec=args.vae, revision=args.revision,
        )  # fmt: skip
    except (PublishedFormatError, FileNotFoundError, ValueError) as err:
        print(f"revq-ray import-revq: error: {err}", file=sys.stderr)
        return 2
    print(f"imported: {out} (tokenizer.json + model/; VAE {args.vae})")
    return 0


def export_main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="revq-ray export-revq",
        description="Write a revq-ray model (quantizer revq/vq, rectifier dcae) in the authors' format: "
        "ckpt.pth, 512T_NC=16384.yaml and latent_stats.safetensors.",
    )
    p.add_argument(
        "--model", required=True, help="Tokenizer bundle, export directory or training run directory"
    )
    p.add_argument("--output", required=True, help="directory to write the three files to")
    args = p.parse_args(argv)
    try:
        out = export_revq(args.model, args.output)
    except (PublishedFormatError, FileNotFoundError, ValueError) as err:
        print(f"revq-ray export-revq: error: {err}", file=sys.stderr)
        return 2
    print(f"exported: {out} (ckpt.pth, 512T_NC=16384.yaml, latent_stats.safetensors)")
    return 0
