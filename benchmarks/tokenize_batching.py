"""``revq-ray tokenize`` encodes images in batches (issue 27): per-image encode (what tokenize did before)
against one batched encode of the same images, side by side, plus the whole command (IDX + labels + flips).

The tokenizer is the Fashion-MNIST study's shape: taef2 at 64x64 (latent 32x8x8), ReVQ T=256 x K=256
(2,048 bits), its codebooks initialized from 256 training latents and not trained (speed does not depend on
the training). Needs ../shared (the taef2 weights and Fashion-MNIST); exits with a message without it.

    python benchmarks/tokenize_batching.py            # N=64 images
    python benchmarks/tokenize_batching.py --n 256

Prints a table and writes ``benchmarks/results/tokenize_batching.json``. Each way runs twice, alternated; the
best of each is kept. Torch uses 2 threads.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("REVQ_SHARED", ROOT.parent / "shared"))
sys.path.insert(0, str(ROOT))


def build_tokenizer(out: Path) -> Path:
    import torch

    from revq_ray.core.model import ReVQModel
    from revq_ray.tokenizer import Tokenizer
    from revq_ray.vae import load_vae
    from revq_ray.vae.images import batch_to_vae_input, read_idx_images

    spec = f"taesd:{SHARED / 'models/taef2'}"
    vae = load_vae(spec, image_size=64)
    imgs = read_idx_images(SHARED / "data/fashion-mnist/train-images-idx3-ubyte.gz", limit=256)
    with torch.no_grad():
        z = vae.encode(batch_to_vae_input(imgs, 64))
    model = ReVQModel(
        list(z.shape[1:]),
        {
            "quantizer": {"type": "revq", "tokens": 256, "codebook_size": 256, "init": "sample"},
            "rectifier": {"type": "cnn", "width": 16, "depth": 1},
        },
    )
    model.standardizer.fit([z])
    model.init_codebook(z, generator=torch.Generator().manual_seed(0))
    model.eval().save_pretrained(out / "model")
    return Tokenizer.build(spec, out / "model").save_pretrained(out / "bundle")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--n", type=int, default=64, help="images (default 64)")
    args = ap.parse_args(argv)
    idx = SHARED / "data/fashion-mnist/train-images-idx3-ubyte.gz"
    if not idx.is_file() or not (SHARED / "models/taef2").is_dir():
        print(f"needs ../shared (Fashion-MNIST and taef2) at {SHARED}; set REVQ_SHARED", file=sys.stderr)
        return 2
    import torch

    from revq_ray.tokenize import build_parser, tokenize
    from revq_ray.tokenizer import Tokenizer
    from revq_ray.vae.images import read_idx_images

    torch.set_num_threads(2)
    tmp = Path(tempfile.mkdtemp(prefix="tok_batching_"))
    bundle = build_tokenizer(tmp)
    tok = Tokenizer.from_pretrained(bundle)
    imgs = list(read_idx_images(idx, limit=args.n))
    tok.encode(imgs[:4])  # warm-up
    res: dict[str, list[float]] = {"per_image": [], "batched": []}
    for _ in range(2):
        t = time.perf_counter()
        one = torch.cat([tok.encode(x) for x in imgs])
        res["per_image"].append(time.perf_counter() - t)
        t = time.perf_counter()
        batched = tok.encode(imgs, batch_size=64)
        res["batched"].append(time.perf_counter() - t)
        assert torch.equal(one, batched), "batched ids differ from per-image ids"
    cmd = [
        "--model",
        str(bundle),
        "--input",
        str(idx),
        "--output",
        str(tmp / "tokens"),
        "--limit",
        str(args.n),
    ]
    cmd += ["--augment", "flip", "--ray", "never"]
    t = time.perf_counter()
    manifest = tokenize(build_parser().parse_args(cmd), log=lambda _m: None)
    whole = time.perf_counter() - t
    rows = {
        "per_image_images_per_s": args.n / min(res["per_image"]),
        "batched_images_per_s": args.n / min(res["batched"]),
        "speedup": min(res["per_image"]) / min(res["batched"]),
        "tokenize_command_items_per_s": manifest["count"] / whole,
    }
    print(f"{args.n} Fashion-MNIST images, taef2 @64x64 + ReVQ T=256 K=256, CPU ({os.cpu_count()} cores)")
    print("| way | images/s |\n| --- | --- |")
    print(f"| encode one image at a time (tokenize before) | {rows['per_image_images_per_s']:.1f} |")
    print(f"| one batched encode (tokenize now) | {rows['batched_images_per_s']:.1f} |")
    print(f"| speedup | {rows['speedup']:.2f}x |")
    print(
        f"| whole `tokenize` (IDX + labels + flip, {manifest['count']} items, load included) | "
        f"{rows['tokenize_command_items_per_s']:.1f} items/s |"
    )
    out = ROOT / "benchmarks/results/tokenize_batching.json"
    record = {"n": args.n, "runs_s": res, "tokenize_command_s": whole, **rows, "machine": platform.platform()}
    out.write_text(json.dumps(record, indent=1) + "\n")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
