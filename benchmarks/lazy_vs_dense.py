"""Training curves of the codebook updates side by side on real latents: ``train.codebook_update`` =
``rows_lazy`` (lazy row-sparse AdamW, the default) vs ``dense`` (DeepSpeed's AdamW over the whole codebook).

Lazy Adam differs from AdamW by design (a row without gradient keeps its moments and does not move; AdamW
decays the moments of every row and keeps moving a row after its last hit), so their trajectories are not
equal and only the curves can say whether it matters. ``rows`` (the row exchange with AdamW) is the dense
update to rounding (tests/train/test_codebook_rows.py) and is not repeated here.

Data: the first ``--train-items`` Fashion-MNIST training images through the pre-trained taef2 encoder (64x64,
latent 32x8x8), encoded once to shards under ``--out`` (Ray Data), ``--val-items`` of them held out by the
trainer. Each mode trains through ``revq_ray.train.run`` (Ray Train + DeepSpeed, CPU, ``--workers``) from the
same seed; the curves are the trainer's own ``metrics.csv`` (training loss every ``--log-every`` steps,
held-out latent MSE every ``--val-every`` steps).

    python benchmarks/lazy_vs_dense.py [--shared ../shared] [--steps 400]

Writes ``benchmarks/results/lazy_vs_dense.json`` and ``benchmarks/results/lazy_vs_dense.png``.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import platform
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("DS_ACCELERATOR", "cpu")
os.environ.setdefault("RAY_TRAIN_V2_ENABLED", "1")
os.environ.setdefault("RAY_DATA_DISABLE_PROGRESS_BARS", "1")

MODES = ("dense", "rows_lazy")


def _cfg(args, shards: Path, mode: str):
    from revq_ray.config import load_config

    sets = {
        "name": f"lazy_vs_dense_{mode}",
        "output_dir": str(args.out / "runs"),
        "data.shards": str(shards),
        "data.val_items": args.val_items,
        "data.shuffle_buffer": 1024,
        "model.quantizer.tokens": args.tokens,
        "model.quantizer.codebook_size": args.codebook_size,
        "model.rectifier.width": 64,
        "model.rectifier.head_dim": 16,
        "train.num_workers": args.workers,
        "train.batch_size": args.batch,
        "train.epochs": 1000,
        "train.max_steps": args.steps,
        "train.lr": args.lr,
        "train.log_every": args.log_every,
        "train.val_every": args.val_every,
        "train.checkpoint_every": args.steps,
        "train.cpus_per_worker": 0.5,
        "train.max_failures": 0,
        "train.codebook_update": mode,
    }
    return load_config(ROOT / "configs" / "debug.yaml", [f"{k}={v}" for k, v in sets.items()])


def _curves(run_dir: Path) -> dict[str, list]:
    with open(run_dir / "metrics.csv", newline="") as f:
        rows = list(csv.DictReader(f))

    def col(name: str) -> list:
        return [(int(r["step"]), float(r[name])) for r in rows if r.get(name) not in (None, "", "nan")]

    return {
        "loss": col("loss"),
        "val_mse": col("val_mse"),
        "usage_mean": col("usage_mean"),
        "samples_per_s": col("samples_per_s"),
    }


def plot(res: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 3.6))
    for mode, style in zip(MODES, ("-", "--")):
        c = res["modes"][mode]["curves"]
        for ax, key, label in (
            (axes[0], "loss", "training loss"),
            (axes[1], "val_mse", "held-out latent MSE"),
        ):
            if c[key]:
                xs, ys = zip(*c[key])
                ax.plot(xs, ys, style, label=mode)
            ax.set_xlabel("step")
            ax.set_title(label)
            ax.set_yscale("log")
            ax.legend()
    fig.suptitle(
        f"codebook_update dense vs rows_lazy, Fashion-MNIST/taef2, T={res['args']['tokens']} "
        f"K={res['args']['codebook_size']} B={res['args']['batch']}"
    )
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shared", type=Path, default=ROOT.parent / "shared")
    p.add_argument("--out", type=Path, default=ROOT / "runs" / "lazy_vs_dense")
    p.add_argument("--train-items", type=int, default=4096)
    p.add_argument("--val-items", type=int, default=256)
    p.add_argument("--tokens", type=int, default=256)
    p.add_argument("--codebook-size", type=int, default=1024)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--steps", type=int, default=400)
    p.add_argument("--log-every", type=int, default=10)
    p.add_argument("--val-every", type=int, default=50)
    p.add_argument("--workers", type=int, default=1)
    p.add_argument("--json", type=Path, default=ROOT / "benchmarks" / "results" / "lazy_vs_dense.json")
    args = p.parse_args(argv)
    idx = args.shared / "data" / "fashion-mnist" / "train-images-idx3-ubyte.gz"
    taef2 = args.shared / "models" / "taef2"
    if not idx.is_file() or not taef2.is_dir():
        print(f"error: needs {idx} and {taef2} (the development assets in ../shared)", file=sys.stderr)
        return 2

    from revq_ray.data.encode import encode_to_shards
    from revq_ray.runtime import init_ray
    from revq_ray.train import run

    init_ray()
    shards = args.out / f"latents_{args.train_items}"
    if not (shards / "manifest.json").is_file():
        res = encode_to_shards(
            str(idx),
            f"taesd:{taef2.resolve()}",
            str(shards),
            limit=args.train_items,
            image_size=64,
            shard_size=1024,
            batch_size=64,
            num_actors=1,
            device="cpu",
            progress=False,
        )
        print(f"encoded: {res.summary()}", flush=True)
    out: dict = {
        "benchmark": "lazy_vs_dense",
        "command": "python benchmarks/lazy_vs_dense.py " + " ".join(argv or sys.argv[1:]),
        "args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "load_avg": os.getloadavg()},
        "modes": {},
    }
    for mode in MODES:
        t0 = time.perf_counter()
        result = run(_cfg(args, shards, mode))
        if result.error:
            raise RuntimeError(f"{mode}: training failed: {result.error}")
        curves = _curves(Path(result.metrics["run_dir"]))
        out["modes"][mode] = {
            "wall_s": round(time.perf_counter() - t0, 1),
            "final_val_mse": result.metrics.get("val_mse"),
            "final_loss": curves["loss"][-1][1] if curves["loss"] else None,
            "curves": curves,
        }
        print(
            f"{mode}: final val_mse {result.metrics.get('val_mse')}, wall {out['modes'][mode]['wall_s']} s",
            flush=True,
        )
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(out, indent=1))
    png = args.json.with_suffix(".png")
    plot(out, png)
    print("\n| codebook_update | final training loss | final held-out latent MSE |")
    print("|---|---:|---:|")
    for mode in MODES:
        m = out["modes"][mode]
        print(f"| {mode} | {m['final_loss']:.4f} | {m['final_val_mse']:.4f} |")
    print(f"\nwrote {args.json} and {png}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
