"""Sampling speed of the stage-2 prior on CPU: the key-value cache against recomputing the prefix.

The prior of ``configs/prior_fashion_mnist.yaml`` (D=128, 4 layers, 4 heads, T=256 ids of K=256 codes,
10 classes; its weights do not change the speed, so they are left untrained here) samples ``--n`` images with
the KV cache (:meth:`PriorTransformer.generate`: T forwards of one slot) and a few with the full-prefix
reference (:meth:`PriorTransformer.generate_full_prefix`: T forwards of up to T slots), without and with
classifier-free guidance (guidance doubles the batch). Both draw the same ids (checked here too).

    python benchmarks/prior_sampling.py                  # preset size, torch's default threads
    python benchmarks/prior_sampling.py --threads 1 --n 16
    python benchmarks/prior_sampling.py --quick          # tiny, a smoke run

Prints a table and writes ``benchmarks/results/prior_sampling.json``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--n", type=int, default=32, help="images sampled with the KV cache, per setting")
    p.add_argument("--n-full", type=int, default=4, help="images sampled by the full-prefix reference")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0 = torch's default)")
    p.add_argument("--quick", action="store_true", help="a tiny model: a smoke run")
    p.add_argument("--output", default=str(ROOT / "benchmarks" / "results" / "prior_sampling.json"))
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    from revq_ray.prior.config import load_prior_config
    from revq_ray.prior.model import PriorSpec, PriorTransformer

    m = load_prior_config(ROOT / "configs" / "prior_fashion_mnist.yaml").model
    tokens, k, classes = (16, 32, 4) if args.quick else (256, 256, 10)
    spec = PriorSpec(
        tokens=tokens,
        codebook_size=k,
        num_classes=classes,
        d_model=m.d_model,
        layers=m.layers,
        heads=m.heads,
        mlp_ratio=m.mlp_ratio,
        embedding="table",
        head=m.head,
    )
    torch.manual_seed(0)
    prior = PriorTransformer(spec).eval()
    rows = []
    for guidance in (1.0, 2.0):
        labels = torch.arange(args.n) % classes
        prior.generate(labels[:2], guidance=guidance)  # warm-up
        t0 = time.perf_counter()
        ids = prior.generate(labels, guidance=guidance, generator=torch.Generator().manual_seed(0))
        kv_s = time.perf_counter() - t0
        small = labels[: args.n_full]
        t0 = time.perf_counter()
        full = prior.generate_full_prefix(
            small, guidance=guidance, generator=torch.Generator().manual_seed(1)
        )
        full_s = time.perf_counter() - t0
        same = torch.equal(
            full, prior.generate(small, guidance=guidance, generator=torch.Generator().manual_seed(1))
        )
        rows.append(
            {
                "guidance": guidance,
                "kv_images": args.n,
                "kv_seconds": round(kv_s, 3),
                "kv_samples_per_s": round(args.n / kv_s, 3),
                "full_images": args.n_full,
                "full_seconds": round(full_s, 3),
                "full_samples_per_s": round(args.n_full / full_s, 3),
                "speedup": round((args.n / kv_s) / (args.n_full / full_s), 2),
                "same_ids": same,
            }
        )
        assert ids.shape == (args.n, tokens)
        print(
            f"guidance {guidance:g}: KV cache {args.n / kv_s:.2f} samples/s, full prefix "
            f"{args.n_full / full_s:.3f} samples/s",
            flush=True,
        )
    n_params = sum(p.numel() for p in prior.parameters())
    print(
        f"prior: T={tokens} K={k} D={spec.d_model} layers={spec.layers} ({n_params:,} parameters), "
        f"torch threads {torch.get_num_threads()}, {platform.processor() or platform.machine()}"
    )
    print("| guidance | KV cache: samples/s | full prefix: samples/s | speed-up | same ids |")
    print("| --- | --- | --- | --- | --- |")
    for r in rows:
        print(
            f"| {r['guidance']:g} | {r['kv_samples_per_s']:.2f} ({r['kv_images']} images, "
            f"{r['kv_seconds']:.1f} s) "
            f"| {r['full_samples_per_s']:.3f} ({r['full_images']} images, {r['full_seconds']:.1f} s) "
            f"| {r['speedup']:.1f}x | {r['same_ids']} |"
        )
    out = {
        "command": "python benchmarks/prior_sampling.py" + (" --quick" if args.quick else ""),
        "spec": dataclasses.asdict(spec),
        "parameters": n_params,
        "torch_threads": torch.get_num_threads(),
        "cpu_count": os.cpu_count(),
        "rows": rows,
        "note": "2-core machine shared with other work: timings are noisy; compare within one run",
    }
    if not args.quick:
        Path(args.output).parent.mkdir(parents=True, exist_ok=True)
        Path(args.output).write_text(json.dumps(out, indent=1))
        print(f"wrote {args.output}")


if __name__ == "__main__":
    main()
