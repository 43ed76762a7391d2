"""Training throughput: the Ray Train + DeepSpeed loop against a plain single-process PyTorch loop.

Same data (synthetic latents, the same items in both), same model (ReVQModel), same optimizer recipe
(AdamW, two param groups, per-module clipping, the lr schedule), same global batch. The plain loop holds the
whole set in memory and indexes random batches: the best case, no data pipeline at all. The Ray loop streams
the shards through Ray Data (file shuffle + local shuffle buffer), runs DeepSpeed, all-reduces, logs every
``--log-every`` steps. Throughput is steady state: samples per second between the first and the last report
before the final validation (startup, codebook init and the final validation/checkpoint are excluded).

    python benchmarks/train_throughput.py                 # CPU: plain vs Ray, 1 and 2 workers
    python benchmarks/train_throughput.py --steps 300 --workers 1 2 4

    # the CPU-scaled 256T-L shape (G=256, K=32,768, d=8), dense vs row-exchanged codebook (issue 28):
    python benchmarks/train_throughput.py --tokens 256 --codebook-size 32768 --batch 64 --steps 100 \
        --workers 1 2 --out benchmarks/results/train_throughput_256TL.json

``--modes`` picks ``train.codebook_update`` values to compare (default: ``dense rows_lazy``); each row also
carries the bytes per step each rank handed to gradient collectives (DeepSpeed's dense all-reduce: the
gradient buffers it reduces; the codebook's row all-gathers: measured by the trainer, ``metrics.csv``).

Prints a table and writes benchmarks/results/train_throughput.json. Goals: ratio >= 0.9 at one worker; two
workers' gain over one >= 0.9 x the plain loop's gain from the second thread.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
os.environ.setdefault("DS_ACCELERATOR", "cpu")
os.environ.setdefault("RAY_TRAIN_V2_ENABLED", "1")
sys.path.insert(0, str(ROOT))
from revq_ray.runtime import extensions_dir  # noqa: E402

os.environ.setdefault("TORCH_EXTENSIONS_DIR", str(extensions_dir()))


def _cfg(args, shards: Path, out: Path, name: str, workers: int, mode: str = "auto"):
    from revq_ray.config import load_config

    sets = {
        "name": name,
        "output_dir": str(out),
        "data.shards": str(shards),
        "data.val_items": args.val_items,
        "data.shuffle_buffer": 4 * args.batch,
        "data.prefetch_batches": 2,
        "model.quantizer.tokens": args.tokens,
        "model.quantizer.codebook_size": args.codebook_size,
        "model.rectifier.width": args.width,
        "model.rectifier.depth": args.depth,
        "model.rectifier.head_dim": 16,
        "train.num_workers": workers,
        "train.zero_stage": args.zero,
        "train.batch_size": args.batch,
        "train.epochs": 1,
        "train.max_steps": args.steps,
        "train.log_every": args.log_every,
        "train.cpus_per_worker": 0.5,
        "train.torch_threads": args.threads,
        "train.max_failures": 0,
        "train.codebook_update": mode,
    }
    return load_config(ROOT / "configs" / "debug.yaml", [f"{k}={v}" for k, v in sets.items()])


def plain_loop(args, cfg, threads: int) -> dict:
    """The same training step without Ray or DeepSpeed: in-memory data, torch AdamW, one process."""
    import torch

    from revq_ray.core.model import ReVQModel
    from revq_ray.core.stats import RunningStats
    from revq_ray.data.shards import read_manifest
    from revq_ray.data.synthetic import synthetic_latents
    from revq_ray.train.engine import lr_factor, param_groups

    torch.set_num_threads(threads)
    manifest = read_manifest(cfg.data.shards)
    z, _ = synthetic_latents(args.items, manifest.latent_shape, seed=args.seed)
    data = torch.from_numpy(z)
    torch.manual_seed(0)
    model = ReVQModel.from_config(manifest.latent_shape, cfg.model)
    model.standardizer.set_stats(RunningStats.from_state_dict(manifest.stats))
    model.init_codebook(data[: cfg.model.quantizer.codebook_size], torch.Generator().manual_seed(0))
    groups = param_groups(model, cfg.train)
    names = [g.pop("name") for g in groups]
    for g in groups:
        g.pop("base_lr")
    opt = torch.optim.AdamW(groups)
    base = [g["lr"] for g in opt.param_groups]
    gen = torch.Generator().manual_seed(1)
    b, steps, warm = cfg.train.batch_size, args.steps, max(5, args.steps // 10)
    t0 = 0.0
    for step in range(steps):
        if step == warm:
            t0 = time.perf_counter()
        for g, lr in zip(opt.param_groups, base):
            g["lr"] = lr * lr_factor(step, steps, cfg.train.final_lr_fraction)
        batch = data[torch.randint(len(data), (b,), generator=gen)]
        out = model(batch)
        opt.zero_grad(set_to_none=True)
        out.loss.backward()
        for g in opt.param_groups:
            torch.nn.utils.clip_grad_norm_(g["params"], cfg.train.grad_clip)
        opt.step()
    dt = time.perf_counter() - t0
    return {"samples_per_s": (steps - warm) * b / dt, "steps": steps - warm, "seconds": dt, "groups": names}


def ray_loop(args, cfg) -> dict:
    from revq_ray.train import run

    t0 = time.perf_counter()
    result = run(cfg)
    wall = time.perf_counter() - t0
    if result.error:
        raise result.error
    with open(Path(result.metrics["run_dir"]) / "metrics.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    # Steady state: from the first report to the last one before the final step (validation, checkpoint).
    first, last = rows[0], rows[-2] if len(rows) > 2 else rows[-1]
    steps = int(last["step"]) - int(first["step"])
    dt = float(last["time_s"]) - float(first["time_s"])
    return {
        "samples_per_s": steps * cfg.train.batch_size / dt,
        "steps": steps,
        "seconds": dt,
        "wall_s_incl_startup": wall,
        "val_mse": result.metrics.get("val_mse"),
        "comm_dense_bytes": _num(last.get("comm_dense_bytes")),
        "comm_rows_bytes": _num(last.get("comm_rows_bytes")),
        "comm_rows_received_bytes": _num(last.get("comm_rows_received_bytes")),
        "rows_touched": _num(last.get("rows_touched")),
    }


def _num(v) -> float:
    return float(v) if v not in (None, "") else 0.0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--items", type=int, default=6144, help="synthetic latents (32, 8, 8)")
    p.add_argument("--val-items", type=int, default=128)
    p.add_argument("--steps", type=int, default=150)
    p.add_argument("--batch", type=int, default=64, help="global batch")
    p.add_argument("--tokens", type=int, default=512)
    p.add_argument("--codebook-size", type=int, default=1024)
    p.add_argument("--width", type=int, default=64)
    p.add_argument("--depth", type=int, default=2)
    p.add_argument("--zero", type=int, default=0)
    p.add_argument("--threads", type=int, default=1, help="torch threads per Ray worker")
    p.add_argument("--log-every", type=int, default=25)
    p.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--skip-plain", action="store_true", help="Ray runs only (no plain-loop baseline)")
    p.add_argument(
        "--modes", nargs="+", default=["dense", "rows_lazy"], help="train.codebook_update values to compare"
    )
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "train_throughput.json"))
    args = p.parse_args(argv)

    import ray

    from revq_ray.data.synthetic import write_synthetic_shards

    tmp = Path(tempfile.mkdtemp(prefix="revq_bench_"))
    shards = tmp / "shards"
    write_synthetic_shards(shards, args.items, (32, 8, 8), shard_size=512, seed=args.seed)
    ray.init(
        address="local", num_cpus=max(8, os.cpu_count() or 1), include_dashboard=False, log_to_driver=False
    )
    rows = []
    try:
        for w in args.workers:
            plain = (
                {"samples_per_s": float("nan")}
                if args.skip_plain
                else plain_loop(args, _cfg(args, shards, tmp / "runs", "plain", w), threads=w * args.threads)
            )
            print(
                f"plain PyTorch, {w * args.threads} thread(s): {plain['samples_per_s']:.1f} samples/s",
                flush=True,
            )
            for mode in args.modes:
                cfg = _cfg(args, shards, tmp / "runs", f"ray_{w}w_{mode}", w, mode)
                r = ray_loop(args, cfg)
                ratio = r["samples_per_s"] / plain["samples_per_s"]
                print(
                    f"Ray Train + DeepSpeed, {w} worker(s), codebook_update={mode}: "
                    f"{r['samples_per_s']:.1f} samples/s (ratio {ratio:.2f}); collective bytes/step/rank: "
                    f"dense all-reduce {r['comm_dense_bytes'] / 1e6:.2f} MB, rows all-gather "
                    f"{r['comm_rows_bytes'] / 1e6:.2f} MB",
                    flush=True,
                )
                rows.append(
                    {"workers": w, "threads_per_worker": args.threads, "mode": mode, "plain": plain, "ray": r,
                     "ratio": ratio}
                )  # fmt: skip
    finally:
        ray.shutdown()
    base = {(r["mode"]): r for r in rows if r["workers"] == 1}
    plain1 = next((r["plain"]["samples_per_s"] for r in rows if r["workers"] == 1), None)
    for r in rows:
        one = base.get(r["mode"])
        r["gain_vs_1_worker"] = r["ray"]["samples_per_s"] / one["ray"]["samples_per_s"] if one else None
        r["plain_gain_vs_1_thread"] = r["plain"]["samples_per_s"] / plain1 if plain1 else None
        r["gain_over_plain_gain"] = (
            r["gain_vs_1_worker"] / r["plain_gain_vs_1_thread"]
            if r["gain_vs_1_worker"] and r["plain_gain_vs_1_thread"] else None
        )  # fmt: skip
    print()
    print(
        "| workers | codebook_update | plain samples/s | Ray Train + DS samples/s | ratio | "
        "gain vs 1 worker | plain gain | gain / plain gain | dense all-reduce MB/step | "
        "rows all-gather MB/step |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|")

    def f2(v) -> str:
        return f"{v:.2f}" if v is not None else "-"

    for r in rows:
        print(
            f"| {r['workers']} | {r['mode']} | {r['plain']['samples_per_s']:.1f} | "
            f"{r['ray']['samples_per_s']:.1f} | {r['ratio']:.2f} | {f2(r['gain_vs_1_worker'])} | "
            f"{f2(r['plain_gain_vs_1_thread'])} | {f2(r['gain_over_plain_gain'])} | "
            f"{r['ray']['comm_dense_bytes'] / 1e6:.2f} | {r['ray']['comm_rows_bytes'] / 1e6:.2f} |"
        )
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(
        json.dumps(
            {
                "benchmark": "train_throughput",
                "command": "python benchmarks/train_throughput.py " + " ".join(argv or sys.argv[1:]),
                "args": vars(args),
                "machine": {
                    "platform": platform.platform(),
                    "cpus": os.cpu_count(),
                    "load_avg": os.getloadavg(),
                },
                "rows": rows,
            },
            indent=1,
        )
    )
    print(f"\nwrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
