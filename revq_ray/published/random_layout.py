"""Write a random checkpoint in the published ReVQ layout, to try ``import-revq`` and fine-tuning offline.

    python -m revq_ray.published.random_layout --model 512T --codebook-size 1024 --output runs/random-512T

Writes ``ckpt.pth`` (``decoder`` and ``quantizer`` with random weights, the published decoder shape of the
chosen model, K codes per group), ``512T_NC=16384.yaml`` and ``stats.safetensors`` (identity statistics
unless ``--stats`` copies a real file). The result is what the authors' hub repos hold, minus the training.
"""

from __future__ import annotations

import argparse
import shutil
import sys
from collections.abc import Sequence
from pathlib import Path

import torch
import yaml

from revq_ray.published.convert import CKPT_NAME, YAML_NAME, PublishedSpec

# name -> (groups, published K, decoder width, depth); latents (32, 8, 8) of DC-AE f32c32 at 256x256
MODELS = {"512T": (512, 16384, 512, 3), "256T-B": (256, 65536, 1024, 4), "256T-L": (256, 262144, 512, 4)}


def write_random_published(
    output: str | Path, model: str = "512T", codebook_size: int | None = None, seed: int = 0
) -> Path:
    """Random weights in the published layout under ``output``; returns ``output``."""
    from safetensors.torch import save_file

    from revq_ray.core.files import follow_umask
    from revq_ray.core.rectifiers_published import DCAERectifier

    if model not in MODELS:
        raise ValueError(f"--model {model!r}: choose one of {', '.join(MODELS)}")
    g, k, width, depth = MODELS[model]
    spec = PublishedSpec((32, 8, 8), int(codebook_size or k), g, width, depth)
    torch.manual_seed(seed)
    decoder = DCAERectifier(32, width, depth, 32).state_dict()
    codes = torch.randn(g, spec.num_code, spec.token_dim)
    offsets = torch.arange(g) * spec.num_code
    quantizer = {"embeddings": codes, "count": torch.zeros(g, spec.num_code), "index_offset": offsets}
    out = Path(output)
    out.mkdir(parents=True, exist_ok=True)
    torch.save({"decoder": decoder, "quantizer": quantizer}, out / CKPT_NAME)
    (out / YAML_NAME).write_text(yaml.safe_dump(spec.to_yaml_dict(), sort_keys=False))
    save_file({"mean": torch.zeros(2048), "std": torch.ones(2048)}, str(out / "stats.safetensors"))
    follow_umask(out / "stats.safetensors")  # safetensors writes 0600
    return out


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m revq_ray.published.random_layout", description=(__doc__ or "").split("\n")[0]
    )
    p.add_argument("--model", default="512T", choices=list(MODELS), help="published shape to imitate")
    p.add_argument("--codebook-size", type=int, default=None, help="K per group (default: the published K)")
    p.add_argument("--stats", default=None, help="copy this statistics file instead of identity statistics")
    p.add_argument("--output", required=True)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    out = write_random_published(args.output, args.model, args.codebook_size, args.seed)
    if args.stats:
        shutil.copyfile(args.stats, out / "stats.safetensors")
    print(f"wrote {out}: {CKPT_NAME}, {YAML_NAME}, stats.safetensors (random weights, {args.model} layout)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
