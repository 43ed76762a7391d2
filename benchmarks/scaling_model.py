"""Scaling model: predicted training samples/s on 1, 8 and 64 GPUs at the published 512T and 256T-L
shapes, with the codebook's gradient all-reduced densely (``train.codebook_update: dense``) or exchanged as
touched rows (``rows`` / ``rows_lazy``).

Inputs:

* bytes per step and rank: the formulas of ``revq_ray.train.codebook.published_bytes`` (dense: the fp32
  gradient of every codebook and rectifier parameter; rows: every rank all-gathers its touched rows as
  (1 + d) fp32 words, at most per-GPU batch x G rows). They are checked against the bytes the trainer measured
  from its collectives' tensors at the CPU scale (``benchmarks/results/train_throughput_256TL.json``,
  ``comm_dense_bytes`` / ``comm_rows_bytes`` columns of ``metrics.csv``); the check is printed.
* collective time, ring algorithms: all-reduce of n bytes = 2 (N-1)/N x n / link; all-gather of m bytes per
  rank = (N-1) x m / link; plus ``--latency-us`` per collective step (2 (N-1) steps for a ring all-reduce,
  N - 1 for an all-gather; the row exchange does two all-gathers: counts, then rows).
* links: 8 GPUs = one node over NVLink (``--nvlink-gbs``, default 450 GB/s per GPU, H100 SXM); 64 GPUs = 8
  nodes, the ring limited by the inter-node link per GPU (``--ib-gbs``, default 50 GB/s = 400 Gb/s
  InfiniBand per GPU).
* compute time of one step on one GPU (``--step-ms``): NOT measured (no GPU was available to this project);
  the default is an assumption stated in the output, the same for both paths (conservative for ``rows_lazy``,
  which also skips the dense gradient fill and the dense AdamW pass over the codebook: on the CPU that made
  one worker several times faster, ``train_throughput_256TL.json``, but a GPU streams those passes far
  faster, so that gain is not carried over).

Communication is not overlapped with compute (DeepSpeed's ZeRO 0 reduces after the backward; the trainer sets
``overlap_comm: false``), so step time = compute + collectives.

    python benchmarks/scaling_model.py            # table + benchmarks/results/scaling_model.json
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

# Published shapes (configs/published_*.yaml): G tokens, K codes, d dims, rectifier parameters, global batch.
SHAPES = {
    "512T": {"G": 512, "K": 16384, "d": 4, "batch_per_gpu": 256},
    "256T-L": {"G": 256, "K": 262144, "d": 8, "batch_per_gpu": 256},
}


def rectifier_params(name: str) -> int:
    """Rectifier parameter count of the published preset (built on the meta device: no memory)."""
    import torch

    from revq_ray.config import load_config
    from revq_ray.core.model import ReVQModel

    preset = {"512T": "published_512T.yaml", "256T-L": "published_256T_L.yaml"}[name]
    cfg = load_config(ROOT / "configs" / preset, [])
    with torch.device("meta"):
        m = ReVQModel.from_config([32, 8, 8] if name == "512T" else [32, 8, 8], cfg.model)
    return sum(p.numel() for p in m.rectifier.parameters())


def predict(
    shape: dict,
    rect: int,
    n: int,
    mode: str,
    link_gbs: float,
    step_ms: float,
    rows_compute: float,
    latency_us: float,
) -> dict:
    from revq_ray.train.codebook import published_bytes

    b = published_bytes(shape["G"], shape["K"], shape["d"], shape["batch_per_gpu"] * n, rect, n)
    link = link_gbs * 1e9
    lat = latency_us * 1e-6
    if n == 1:
        comm = 0.0
    elif mode == "dense":
        nbytes = b["dense_codebook"] + b["rectifier"]
        comm = 2 * (n - 1) / n * nbytes / link + 2 * (n - 1) * lat
    else:
        comm = 2 * (n - 1) / n * b["rectifier"] / link + 2 * (n - 1) * lat
        comm += (n - 1) * b["rows_sent"] / link + 2 * (n - 1) * lat
    compute = step_ms * 1e-3 * (rows_compute if mode != "dense" else 1.0)
    t = compute + comm
    return {
        "gpus": n,
        "mode": mode,
        "link_GBps": link_gbs if n > 1 else None,
        "bytes_per_rank": (b["dense_codebook"] + b["rectifier"])
        if mode == "dense"
        else b["rows_sent"] + b["rectifier"],
        "compute_ms": compute * 1e3,
        "comm_ms": comm * 1e3,
        "samples_per_s": n * shape["batch_per_gpu"] / t,
    }


def measured_check() -> list[dict]:
    """Measured CPU-scale bytes (trainer, from its collectives' tensors) against the formulas."""
    from revq_ray.train.codebook import published_bytes

    path = ROOT / "benchmarks" / "results" / "train_throughput_256TL.json"
    if not path.is_file():
        return []
    data = json.loads(path.read_text())
    a = data["args"]
    out = []
    for r in data["rows"]:
        if r["workers"] < 2:
            continue
        b = published_bytes(a["tokens"], a["codebook_size"], 8, a["batch"], 0, r["workers"])
        out.append(
            {
                "mode": r["mode"],
                "workers": r["workers"],
                "measured_dense_bytes": r["ray"]["comm_dense_bytes"],
                "measured_rows_bytes": r["ray"]["comm_rows_bytes"],
                "formula_dense_codebook": b["dense_codebook"],
                "formula_rows_max": b["rows_sent"],
                "rows_touched": r["ray"].get("rows_touched"),
            }
        )
    return out


def rows_compute_ratio() -> float | None:
    path = ROOT / "benchmarks" / "results" / "train_throughput_256TL.json"
    if not path.is_file():
        return None
    rows = json.loads(path.read_text())["rows"]
    one = {r["mode"]: r["ray"]["samples_per_s"] for r in rows if r["workers"] == 1}
    if "dense" in one and "rows_lazy" in one:
        return one["dense"] / one["rows_lazy"]  # step time ratio rows_lazy / dense
    return None


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument(
        "--step-ms",
        type=float,
        default=25.0,
        help="ASSUMED compute time of one step of 256 latents on one H100 (not measured)",
    )
    p.add_argument("--nvlink-gbs", type=float, default=450.0)
    p.add_argument("--ib-gbs", type=float, default=50.0)
    p.add_argument("--latency-us", type=float, default=10.0)
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "scaling_model.json"))
    args = p.parse_args(argv)
    ratio = rows_compute_ratio()
    rc = 1.0  # see the module doc: the CPU's optimizer-bound gain is not carried over to a GPU
    rows = []
    for name, shape in SHAPES.items():
        rect = rectifier_params(name)
        for n, link in ((1, 0.0), (8, args.nvlink_gbs), (64, args.ib_gbs)):
            for mode in ("dense", "rows_lazy"):
                r = predict(shape, rect, n, mode, link, args.step_ms, rc, args.latency_us)
                rows.append({"shape": name, "rectifier_params": rect, **r})
    print(
        f"compute per step per GPU: {args.step_ms} ms ASSUMED (no GPU measured), the same for both paths "
        f"(CPU one-worker step time rows_lazy / dense: {ratio if ratio is None else round(ratio, 2)}, "
        "not used)"
    )
    print(
        f"links: 8 GPUs NVLink {args.nvlink_gbs} GB/s, 64 GPUs (8 nodes) {args.ib_gbs} GB/s per GPU; "
        f"{args.latency_us} us per ring step\n"
    )
    print("| shape | GPUs | codebook_update | MB / step / rank | comm ms | step ms | samples/s | x 1 GPU |")
    print("|---|---:|---|---:|---:|---:|---:|---:|")
    one = {(r["shape"], r["mode"]): r["samples_per_s"] for r in rows if r["gpus"] == 1}
    for r in rows:
        r["speedup_vs_1"] = r["samples_per_s"] / one[(r["shape"], r["mode"])]
        print(
            f"| {r['shape']} | {r['gpus']} | {r['mode']} | {r['bytes_per_rank'] / 1e6:,.1f} | "
            f"{r['comm_ms']:.1f} | "
            f"{r['compute_ms'] + r['comm_ms']:.1f} | {r['samples_per_s']:,.0f} | {r['speedup_vs_1']:.1f} |"
        )
    # The all-gather grows with the number of ranks, the all-reduce does not: past this many GPUs the row
    # exchange moves more bytes than the dense all-reduce (worst case: no row shared between ranks).
    from revq_ray.train.codebook import published_bytes

    crossover = {}
    for name, shape in SHAPES.items():
        b = published_bytes(shape["G"], shape["K"], shape["d"], shape["batch_per_gpu"], 0, 1)
        crossover[name] = round(1 + 2 * b["dense_codebook"] / b["rows_sent"])
        print(
            f"{name}: the row all-gather moves more than the dense all-reduce beyond ~{crossover[name]} GPUs"
        )
    check = measured_check()
    if check:
        print("\nCPU-scale check (bytes per step and rank handed to the collectives, measured vs formula):")
        for c in check:
            print(f"  {c}")
    Path(args.out).write_text(
        json.dumps(
            {
                "benchmark": "scaling_model",
                "command": "python benchmarks/scaling_model.py " + " ".join(argv or sys.argv[1:]),
                "assumptions": {
                    "step_ms_per_gpu_ASSUMED": args.step_ms,
                    "nvlink_GBps": args.nvlink_gbs,
                    "ib_GBps": args.ib_gbs,
                    "latency_us": args.latency_us,
                    "rows_compute_factor": rc,
                },
                "rows": rows,
                "cpu_scale_check": check,
            },
            indent=1,
        )
    )
    print(f"\nwrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
