"""Nearest-code search: revq-ray's chunked ``nearest_code`` against the reference ReVQ search.

The reference (``find_nearest`` in the ReVQ repository) runs ``torch.cdist`` + ``min`` per group, vmapped with
``chunk_size=2``: two full (B, K) distance matrices at a time. Each (method, shape) runs in a fresh
subprocess so the peak memory is its own: on CPU the extra RSS high-water mark (``ru_maxrss`` after the
search minus before it, inputs already allocated and kernels warmed up on a tiny slice); on CUDA
``torch.cuda.max_memory_allocated`` above the inputs.

    python benchmarks/nn_search.py                       # CPU, the three published shapes
    python benchmarks/nn_search.py --device cuda --batch 256 256 256
    python benchmarks/nn_search.py --quick               # tiny shapes, a smoke run

Prints a table and writes ``benchmarks/results/nn_search.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
SHAPES = [(512, 16384, 4), (256, 65536, 8), (256, 262144, 8)]  # (G, K, d): 512T, 256T-B, 256T-L
# CPU batches: about 2e9 distances per call at every shape so one call takes seconds, not minutes, on 2
# cores. The reference trains with 256 latents per step (B = 256 tokens per group).
CPU_BATCH = [256, 128, 32]
MB = 1 << 20


def baseline_search(
    tokens_btd: torch.Tensor, codebook_gkd: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """The reference's search: ``vmap(cdist + min, chunk_size=2)`` over groups. Returns (ids_bt, dist_bt)
    (dist is Euclidean, not squared, as cdist gives it)."""

    def find_nearest(x: torch.Tensor, y: torch.Tensor):
        dist_mat = torch.cdist(x, y)
        min_dist, indices = torch.min(dist_mat, dim=-1)
        return min_dist, indices

    fn = torch.vmap(find_nearest, in_dims=0, out_dims=0, chunk_size=2)
    with torch.no_grad():
        dist_gb, ids_gb = fn(tokens_btd.transpose(0, 1), codebook_gkd)
    return ids_gb.t(), dist_gb.t()


def baseline_bytes(B: int, K: int) -> int:
    """The reference's distance matrices alive at once: two groups of (B, K) float32."""
    return B * K * 4 * 2


# ------------------------------------------------------------------------------------------ one measurement
def _measure(
    method: str, G: int, K: int, d: int, B: int, repeats: int, device: str, threads: int, budget: float
):
    """Runs inside the subprocess; prints one JSON line."""
    import resource

    torch.set_num_threads(threads)
    sys.path.insert(0, str(ROOT))
    from revq_ray.core.quantizers.search import nearest_code, plan_search

    dev = torch.device(device)
    g = torch.Generator().manual_seed(0)
    tokens = torch.randn(B, G, d, generator=g).to(dev)
    codebook = torch.randn(G, K, d, generator=g).to(dev)

    if method == "ours":
        fn = lambda t, c: nearest_code(t, c, budget)  # noqa: E731
    else:
        fn = baseline_search

    def sync():
        if dev.type == "cuda":
            torch.cuda.synchronize()

    fn(tokens[:2, :2], codebook[:2, :1024])  # warm up kernels and the allocator on a tiny slice
    sync()
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    else:
        base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    times, cpu_times = [], []
    for _ in range(repeats):
        r0 = resource.getrusage(resource.RUSAGE_SELF)
        t0 = time.perf_counter()
        ids, _ = fn(tokens, codebook)
        sync()
        times.append(time.perf_counter() - t0)
        r1 = resource.getrusage(resource.RUSAGE_SELF)
        cpu_times.append((r1.ru_utime - r0.ru_utime) + (r1.ru_stime - r0.ru_stime))
    if dev.type == "cuda":
        peak = torch.cuda.max_memory_allocated() - base
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - base
    out = {
        "method": method,
        "times_s": times,
        "best_s": min(times),
        "median_s": sorted(times)[len(times) // 2],
        "cpu_times_s": cpu_times,
        "best_cpu_s": min(cpu_times),
        "peak_extra_bytes": int(peak),
        "ids_checksum": int((ids.long().cpu() * torch.arange(1, G + 1)).sum()),
    }
    if method == "ours":
        p = plan_search(B, G, K, d, budget_mb=budget, device=dev)
        out["plan"] = {k: getattr(p, k) for k in p.__dataclass_fields__}
    print(json.dumps(out))


def run_one(method: str, G: int, K: int, d: int, B: int, args) -> dict:
    cmd = [
        sys.executable, __file__, "--_child", method, str(G), str(K), str(d), str(B),
        "--repeats", str(args.repeats), "--device", args.device, "--threads", str(args.threads),
        "--budget-mb", str(args.budget_mb),
    ]  # fmt: skip
    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads), MKL_NUM_THREADS=str(args.threads))
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=args.timeout)
    if proc.returncode != 0:
        return {"method": method, "error": proc.stderr.strip().splitlines()[-1:] or ["failed"]}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def check_agreement(G: int, K: int, d: int, B: int, device: str) -> float:
    """Fraction of equal ids between the two methods on the first 4 groups (float32 near-ties may differ)."""
    sys.path.insert(0, str(ROOT))
    from revq_ray.core.quantizers.search import nearest_code

    g = torch.Generator().manual_seed(0)
    gs = min(G, 4)
    tokens = torch.randn(B, G, d, generator=g)[:, :gs].to(device)
    codebook = torch.randn(G, K, d, generator=g)[:gs].to(device)
    ours, _ = nearest_code(tokens, codebook)
    ref, _ = baseline_search(tokens, codebook)
    return float((ours == ref).float().mean())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cpu")
    ap.add_argument(
        "--batch", type=int, nargs="+", help="batch per shape (default: CPU-sized, see CPU_BATCH)"
    )
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=torch.get_num_threads())
    ap.add_argument("--budget-mb", type=float, default=256.0, help="nearest_code's search_budget_mb")
    ap.add_argument(
        "--baseline-limit-mb", type=float, default=8192.0,
        help="skip the baseline where its two (B, K) distance matrices would exceed this",
    )  # fmt: skip
    ap.add_argument("--quick", action="store_true", help="tiny shapes (smoke run)")
    ap.add_argument("--timeout", type=float, default=3600.0, help="seconds per subprocess")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "nn_search.json"))
    ap.add_argument("--_child", nargs=5, help=argparse.SUPPRESS)
    args = ap.parse_args()

    if args._child:
        method, G, K, d, B = args._child[0], *map(int, args._child[1:])
        _measure(method, G, K, d, B, args.repeats, args.device, args.threads, args.budget_mb)
        return

    shapes = [(16, 4096, 4), (8, 16384, 8)] if args.quick else SHAPES
    batches = args.batch or ([64, 32] if args.quick else CPU_BATCH)
    if len(batches) != len(shapes):
        ap.error(f"--batch needs {len(shapes)} values (one per shape)")
    rows = []
    for (G, K, d), B in zip(shapes, batches):
        need = baseline_bytes(B, K)
        print(f"G={G} K={K} d={d} B={B}: running ours ...", flush=True)
        ours = run_one("ours", G, K, d, B, args)
        if need > args.baseline_limit_mb * MB:
            base = {"method": "baseline", "skipped": f"needs {need / MB:.0f} MB > --baseline-limit-mb"}
        else:
            print(f"G={G} K={K} d={d} B={B}: running baseline ...", flush=True)
            base = run_one("baseline", G, K, d, B, args)
        row = {
            "groups": G, "codes": K, "dim": d, "batch": B, "distances_per_call": B * G * K,
            "baseline_matrix_bytes": need, "baseline_matrix_bytes_at_batch_256": baseline_bytes(256, K),
            "ours": ours, "baseline": base,
        }  # fmt: skip
        if "best_s" in ours and "best_s" in base:
            row["speedup"] = base["best_s"] / ours["best_s"]
            row["speedup_cpu_time"] = base["best_cpu_s"] / ours["best_cpu_s"]
            row["ids_agree_first_groups"] = check_agreement(G, K, d, min(B, 64), args.device)
        rows.append(row)

    hdr = f"{'G':>4} {'K':>7} {'d':>2} {'B':>4} | {'ours s':>8} {'base s':>8} {'speedup':>7} | "
    hdr += f"{'ours cpu':>8} {'base cpu':>8} {'speedup':>7} | "
    hdr += f"{'ours MB':>8} {'base MB':>8} {'base need MB':>12} | {'ns/dist ours':>12} {'base':>6} | agree"
    print(hdr)
    print("-" * len(hdr))
    for r in rows:
        o, b = r["ours"], r["baseline"]
        n = r["distances_per_call"]

        def f(x, key, scale=1.0, fmt="8.3f"):
            return format(x[key] * scale, fmt) if key in x else format("-", ">" + fmt.split(".")[0])

        print(
            f"{r['groups']:>4} {r['codes']:>7} {r['dim']:>2} {r['batch']:>4} | "
            f"{f(o, 'best_s')} {f(b, 'best_s')} "
            f"{format(r['speedup'], '7.2f') if 'speedup' in r else '      -'} | "
            f"{f(o, 'best_cpu_s')} {f(b, 'best_cpu_s')} "
            f"{format(r['speedup_cpu_time'], '7.2f') if 'speedup_cpu_time' in r else '      -'} | "
            f"{f(o, 'peak_extra_bytes', 1 / MB, '8.1f')} {f(b, 'peak_extra_bytes', 1 / MB, '8.1f')} "
            f"{r['baseline_matrix_bytes'] / MB:>12.1f} | "
            f"{f(o, 'best_s', 1e9 / n, '12.3f')} {f(b, 'best_s', 1e9 / n, '6.2f')} | "
            f"{r.get('ids_agree_first_groups', '-')}"
        )
        for k in ("error", "skipped"):
            for who, x in (("ours", o), ("baseline", b)):
                if k in x:
                    print(f"    {who}: {k}: {x[k]}")
    result = {
        "benchmark": "nn_search",
        "device": args.device,
        "threads": args.threads,
        "budget_mb": args.budget_mb,
        "repeats": args.repeats,
        "torch": torch.__version__,
        "machine": platform.machine(),
        "processor": platform.processor(),
        "cpu_count": os.cpu_count(),
        "note": (
            "best-of-repeats wall time and process CPU time (user+sys) per call; peak = extra RSS high-water "
            "(CPU) or CUDA allocation. CPU time is the robust figure on a shared machine."
        ),
        "rows": rows,
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
