"""Peak memory of a training-style streamed read of latent shards: N items against 10N items.

Writes synthetic shards (latent 32x8x8 float32 = 8 KiB each), then iterates them the way a training worker
does (``latent_dataset(keys=False).iter_torch_batches(batch_size, local_shuffle_buffer_size)``) and
samples, every 0.1 s, the RSS of the driver (and, every second, its private USS: RSS also counts the
shared-memory object-store pages the driver maps, bounded by the store size), and the summed RSS of the
Ray workers. Streaming means both stay flat when the dataset grows 10x; loading the set would grow them
by the data size. Each size runs in a fresh subprocess with a fresh local Ray, so peaks are its own.

    python benchmarks/stream_memory.py               # N = 4000 (31 MiB) vs 10N (313 MiB)
    python benchmarks/stream_memory.py --n 1000

Prints a table and writes ``benchmarks/results/stream_memory.json``.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
MIB = 1 << 20
SHAPE = (32, 8, 8)


def _child(shards: str, batch_size: int, buffer: int) -> None:
    import psutil
    import ray

    sys.path.insert(0, str(ROOT))
    from revq_ray.data.reader import latent_dataset
    from revq_ray.data.shards import read_manifest

    ray.init(
        address="local",
        num_cpus=4,
        include_dashboard=False,
        log_to_driver=False,
        object_store_memory=512 * MIB,
    )
    ray.data.DataContext.get_current().enable_progress_bars = False
    me = psutil.Process()
    base_driver = me.memory_info().rss
    base_uss = me.memory_full_info().uss
    peaks = {"driver": 0, "driver_uss": 0, "workers": 0}
    stop = threading.Event()
    workers: list[psutil.Process] = []

    def refresh_workers() -> None:
        workers.clear()
        for p in me.children(recursive=True):
            try:
                if "default_worker" in " ".join(p.cmdline()):
                    workers.append(p)
            except (psutil.NoSuchProcess, psutil.AccessDenied):
                pass

    def workers_rss() -> int:
        total = 0
        for p in workers:
            with contextlib.suppress(psutil.NoSuchProcess, psutil.AccessDenied):
                total += p.memory_info().rss
        return total

    refresh_workers()
    base_workers = workers_rss()

    def sample() -> None:
        # Light sampling (0.1 s; worker list refreshed every second) so the sampler does not slow the read.
        i = 0
        while not stop.is_set():
            if i % 10 == 0:
                refresh_workers()
                peaks["driver_uss"] = max(peaks["driver_uss"], me.memory_full_info().uss)
            peaks["driver"] = max(peaks["driver"], me.memory_info().rss)
            peaks["workers"] = max(peaks["workers"], workers_rss())
            i += 1
            time.sleep(0.1)

    th = threading.Thread(target=sample, daemon=True)
    th.start()
    t0 = time.perf_counter()
    seen = 0
    ds = latent_dataset(shards, keys=False, seed=0)
    total = read_manifest(shards).count
    trace, next_mark = [], 0  # driver USS at every 10% of the items: flat means no growth with data read
    for batch in ds.iter_torch_batches(batch_size=batch_size, local_shuffle_buffer_size=buffer):
        seen += len(batch["latent"])
        if seen >= next_mark:
            trace.append([seen, me.memory_full_info().uss / MIB])
            next_mark += total // 10
    secs = time.perf_counter() - t0
    stop.set()
    th.join()
    print(
        json.dumps(
            {
                "items": seen,
                "seconds": secs,
                "driver_base_mib": base_driver / MIB,
                "driver_peak_mib": peaks["driver"] / MIB,
                "driver_uss_base_mib": base_uss / MIB,
                "driver_uss_peak_mib": peaks["driver_uss"] / MIB,
                "workers_base_mib": base_workers / MIB,
                "workers_peak_mib": peaks["workers"] / MIB,
                "driver_uss_trace_mib": trace,
            }
        )
    )
    ray.shutdown()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=4000)
    ap.add_argument("--batch-size", type=int, default=256)
    ap.add_argument("--shuffle-buffer", type=int, default=2048)
    ap.add_argument("--shard-size", type=int, default=1000)
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        _child(args.child, args.batch_size, args.shuffle_buffer)
        return

    sys.path.insert(0, str(ROOT))
    from revq_ray.data.synthetic import write_synthetic_shards

    tmp = Path(tempfile.mkdtemp(prefix="revq_stream_bench_"))
    rows = []
    try:
        for n in (args.n, 10 * args.n):
            out = tmp / f"n{n}"
            t0 = time.perf_counter()
            write_synthetic_shards(out, n, SHAPE, shard_size=args.shard_size, seed=0)
            write_s = time.perf_counter() - t0
            cmd = [sys.executable, __file__, "--child", str(out), "--batch-size", str(args.batch_size)]
            cmd += ["--shuffle-buffer", str(args.shuffle_buffer)]
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=1800)
            lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
            if proc.returncode or not lines:
                raise RuntimeError(f"child failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
            r = json.loads(lines[-1])
            r.update(n=n, data_mib=n * 4 * 32 * 64 / MIB, write_seconds=write_s)
            rows.append(r)
            shutil.rmtree(out, ignore_errors=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)

    print(
        f"\nstreamed read, latent {SHAPE} float32, batch {args.batch_size}, "
        f"local shuffle buffer {args.shuffle_buffer}"
    )
    print(
        f"{'items':>7} {'data MiB':>9} {'driver RSS peak':>16} {'(+ over start)':>15} "
        f"{'driver private (USS) +':>23} {'Ray workers RSS peak':>21} {'items/s':>8}"
    )
    for r in rows:
        print(
            f"{r['n']:>7} {r['data_mib']:>9.0f} {r['driver_peak_mib']:>16.0f} "
            f"{r['driver_peak_mib'] - r['driver_base_mib']:>15.0f} "
            f"{r['driver_uss_peak_mib'] - r['driver_uss_base_mib']:>23.0f} {r['workers_peak_mib']:>21.0f} "
            f"{r['items'] / r['seconds']:>8.0f}"
        )
    small, big = rows
    ratio = (big["driver_peak_mib"] + big["workers_peak_mib"]) / (
        small["driver_peak_mib"] + small["workers_peak_mib"]
    )
    print(f"10x the data -> {ratio:.2f}x the peak memory (driver + workers)")
    trace = ", ".join(f"{int(n)}: {m:.0f}" for n, m in big["driver_uss_trace_mib"])
    print(f"driver USS (MiB) while reading {big['n']} items, every 10%: {trace}")
    out = ROOT / "benchmarks/results/stream_memory.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(
        json.dumps(
            {
                "latent_shape": SHAPE,
                "batch_size": args.batch_size,
                "shuffle_buffer": args.shuffle_buffer,
                "shard_size": args.shard_size,
                "cpu_count": os.cpu_count(),
                "load_avg_1m": os.getloadavg()[0],
                "rows": rows,
                "peak_ratio_10x": ratio,
            },
            indent=1,
        )
    )
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
