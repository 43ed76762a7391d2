"""README results, images: Fashion-MNIST through the pre-trained taef2 autoencoder, tokenized at several bit
budgets, against the VAE alone; plus plain VQ (no reset, no rectifier) at equal bits.

    python benchmarks/results_fmnist.py [--shared ../shared] [--out runs/results_fmnist] [--steps 300]

1. the last ``--val-items`` Fashion-MNIST images are written as PNG files (held out: never trained on);
2. the first ``--train-items`` images and the held-out PNGs are encoded to latent shards (Ray Data, taef2 at
   64x64: latent 32x8x8, the geometry of a 256x256 image through DC-AE f32c32);
3. each row trains through ``revq_ray.train`` (Ray Train + DeepSpeed, CPU) for ``--steps`` steps;
4. each row is evaluated with ``revq_ray.eval`` on the held-out PNGs: PSNR/SSIM of the VAE alone and of the
   tokenized round trip (image -> ids -> image), latent MSE, codebook usage.

Prints a markdown table and writes ``benchmarks/results/results_fmnist.json``. Re-running resumes (finished
encodes and runs are kept). Needs the development assets in ``../shared`` (not part of the package).
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

# (row name, method row of revq_ray.compare.ROWS, tokens T, codebook size K): bits = T * log2(K)
ROWS = [
    ("revq T256 K16", "revq", 256, 16),
    ("revq T256 K256", "revq", 256, 256),
    ("vq T256 K256", "vq", 256, 256),
    ("revq T512 K256", "revq", 512, 256),
]


def _log(msg: str) -> None:
    print(f"[results_fmnist] {msg}", flush=True)


def write_val_pngs(idx: Path, out: Path, n: int) -> Path:
    """The last ``n`` images of the IDX file as PNGs (the training encode takes the first ones)."""
    from PIL import Image

    out.mkdir(parents=True, exist_ok=True)
    if len(list(out.glob("*.png"))) == n:
        return out
    with gzip.open(idx) as f:
        images = np.frombuffer(f.read(), np.uint8, offset=16).reshape(-1, 28, 28)
    for i, img in enumerate(images[-n:]):
        Image.fromarray(img).save(out / f"{len(images) - n + i:05d}.png")
    return out


def train_cfg(row: str, tokens: int, k: int, args, shards: Path, val: Path, spec: str) -> dict:
    """One row's training config: this base, shaped by ``revq_ray.compare.row_config`` (the same rows, bits
    and run naming as ``revq-ray compare``)."""
    from revq_ray.compare import row_config

    base: dict = {
        "seed": 0,
        "vae": spec,
        "data": {"shuffle_buffer": 2048, "prefetch_batches": 2},
        "model": {
            "quantizer": {
                "type": "revq",
                "init": "sample",
                "reset": {"enabled": True, "unit": "steps", "interval": 50},
            },
            "rectifier": {"type": "vit", "width": args.rect_width, "depth": args.rect_depth, "head_dim": 32},
        },
        "train": {
            "num_workers": 1,
            "use_gpu": False,
            "cpus_per_worker": 1,
            "torch_threads": args.threads,
            "zero_stage": 0,
            "precision": "fp32",
            "batch_size": args.batch,
            "lr": 0.01,
            "log_every": 50,
            "val_every": max(1, args.steps // 4),
            "checkpoint_every": args.steps,
            "keep_checkpoints": 1,
            "max_failures": 0,
        },
    }
    return row_config(
        base,
        row,
        shards=str(shards),
        val_shards=str(val),
        tokens=tokens,
        k=k,
        steps=args.steps,
        output=args.out,
    )


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--shared", type=Path, default=Path(os.environ.get("REVQ_SHARED", ROOT.parent / "shared")))
    p.add_argument("--out", type=Path, default=ROOT / "runs" / "results_fmnist")
    p.add_argument("--train-items", type=int, default=8192)
    p.add_argument("--val-items", type=int, default=512)
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--rect-width", type=int, default=64)
    p.add_argument("--rect-depth", type=int, default=2)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--rows", default="", help="comma-separated subset of row names (default: all)")
    p.add_argument("--json", type=Path, default=ROOT / "benchmarks" / "results" / "results_fmnist.json")
    args = p.parse_args(argv)

    idx = args.shared / "data" / "fashion-mnist" / "train-images-idx3-ubyte.gz"
    taef2 = args.shared / "models" / "taef2"
    if not idx.is_file() or not taef2.is_dir():
        print(f"error: needs {idx} and {taef2} (the development assets in ../shared)", file=sys.stderr)
        return 2
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    os.environ.setdefault("RAY_DATA_DISABLE_PROGRESS_BARS", "1")
    spec = f"taesd:{taef2.resolve()}"
    args.out.mkdir(parents=True, exist_ok=True)

    from revq_ray.config import parse_config
    from revq_ray.data.encode import encode_to_shards
    from revq_ray.eval.evaluate import evaluate
    from revq_ray.runtime import init_ray
    from revq_ray.train import run

    init_ray()
    t0 = time.perf_counter()
    val_png = write_val_pngs(idx, args.out / "val_png", args.val_items)
    shards, val_shards = args.out / "latents" / "train", args.out / "latents" / "val"
    for src, dst, limit in ((str(idx), shards, args.train_items), (str(val_png), val_shards, None)):
        res = encode_to_shards(
            src, spec, str(dst), limit=limit, image_size=64, shard_size=1024, batch_size=64,
            num_actors=1, device="cpu", progress=True,
        )  # fmt: skip
        _log(f"encode {dst.name}: {res.summary()}")
    encode_s = time.perf_counter() - t0

    wanted = {r.strip() for r in args.rows.split(",") if r.strip()}
    rows = []
    for name, row, tokens, k in ROWS:
        if wanted and name not in wanted:
            continue
        cfg = parse_config(train_cfg(row, tokens, k, args, shards, val_shards, spec))
        t = time.perf_counter()
        result = run(cfg)
        if result.error:
            raise RuntimeError(f"{name}: training failed: {result.error}")
        train_s = time.perf_counter() - t
        run_dir = Path(result.metrics["run_dir"])
        ev = evaluate(
            run_dir, val_png, args.out / "eval" / cfg.name, vae=spec, limit=args.val_items, device="cpu"
        )
        s = ev["summary"]
        rows.append(
            {
                "name": name,
                "method": row,
                "tokens": tokens,
                "codebook_size": k,
                "bits_per_image": cfg.model.quantizer.bits_per_sample,
                "steps": args.steps,
                "batch_size": args.batch,
                "train_s": round(train_s, 1),
                "val_mse": result.metrics.get("val_mse"),
                "val_mse_norect": result.metrics.get("val_mse_norect"),
                "usage": result.metrics.get("usage_mean"),
                "summary": s,
                "report": str(args.out / "eval" / cfg.name / "report.md"),
            }
        )
        _log(f"{name}: {json.dumps(s)}")

    out = {
        "what": "Fashion-MNIST -> taef2 (64x64, latent 32x8x8) -> tokenizer; metrics on held-out images",
        "command": "python benchmarks/results_fmnist.py "
        + " ".join(argv if argv is not None else sys.argv[1:]),
        "train_items": args.train_items,
        "val_items": args.val_items,
        "encode_s": round(encode_s, 1),
        "machine": f"{platform.machine()}, {os.cpu_count()} CPU cores, no GPU",
        "rows": rows,
    }
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(out, indent=2, default=str))
    print(table(out))
    return 0


def table(res: dict) -> str:
    """The README's table (held-out metrics from each row's evaluation)."""
    lines = [
        "| tokenizer | bits / image | PSNR VAE only | PSNR tokenized | SSIM tokenized "
        "| latent MSE without -> with rectifier | held-out usage |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for r in res["rows"]:
        s = r["summary"]
        lines.append(
            f"| {r['name']} | {r['bits_per_image']:g} | {s['psnr_vae_only']:.2f} dB | "
            f"{s['psnr_tokenized']:.2f} dB | {s['ssim_tokenized']:.3f} | "
            f"{s['latent_mse_std_without_rectifier']:.4f} -> "
            f"{s['latent_mse_std_with_rectifier']:.4f} | {100 * s['usage_mean']:.1f}% |"
        )
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
