"""Encode throughput of ``revq_ray.data.encode_to_shards``: items/s with 1 and 2 VAE actors, side by side with
a direct single-process loop (read + resize + encode in the driver, no Ray) as the baseline.

Inputs: the first N Fashion-MNIST images (IDX) through the pre-trained taef2 at 64x64 when ../shared is
present; otherwise N PNG crops of scikit-image's bundled photos through a freshly initialized built-in
ImageConvVAE at 64x64 (throughput does not depend on the weights).

    python benchmarks/encode_throughput.py            # N=512
    python benchmarks/encode_throughput.py --n 128    # quicker

Prints a table and writes ``benchmarks/results/encode_throughput.json``. Every Ray run encodes into a fresh
directory (no resume); each actor gets one CPU and one torch thread, and so does the baseline.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("REVQ_SHARED", ROOT.parent / "shared"))
sys.path.insert(0, str(ROOT))


def _inputs(tmp: Path, n: int) -> tuple[str, str, str]:
    """-> (input path, VAE spec, description)."""
    idx = SHARED / "data/fashion-mnist/train-images-idx3-ubyte.gz"
    taef2 = SHARED / "models/taef2"
    if idx.is_file() and taef2.is_dir():
        return str(idx), f"taesd:{taef2}", "Fashion-MNIST (IDX) -> taef2 @64x64, latent 32x8x8"
    import numpy as np
    import PIL.Image
    import skimage.data
    import torch

    from revq_ray.vae.builtin import ImageConvVAE

    photos = [skimage.data.astronaut(), skimage.data.coffee(), skimage.data.chelsea(), skimage.data.rocket()]
    img_dir = tmp / "images"
    img_dir.mkdir()
    rng = np.random.default_rng(0)
    for i in range(n):
        p = photos[i % len(photos)]
        y, x = rng.integers(0, p.shape[0] - 128), rng.integers(0, p.shape[1] - 128)
        PIL.Image.fromarray(p[y : y + 128, x : x + 128]).save(img_dir / f"{i:05d}.png")
    torch.manual_seed(0)
    ImageConvVAE(image_size=64, width=64, latent_channels=8).save_pretrained(str(tmp / "vae"))
    return str(img_dir), f"builtin:{tmp / 'vae'}", "skimage photo crops (PNG) -> built-in ImageConvVAE @64x64"


def _direct(input_path: str, spec: str, n: int, batch_size: int) -> float:
    """Baseline: the same work in one process, no Ray. Returns seconds."""
    import torch

    from revq_ray.data.sources import decode_image, is_idx_file
    from revq_ray.vae import load_vae
    from revq_ray.vae.images import read_idx_images, to_vae_input

    torch.set_num_threads(1)
    t0 = time.perf_counter()
    vae = load_vae(spec, image_size=64)
    if is_idx_file(input_path):
        xs = [to_vae_input(im, 64) for im in read_idx_images(input_path, limit=n)]
    else:
        files = sorted(Path(input_path).glob("*.png"))[:n]
        xs = [decode_image(f.read_bytes(), 64) for f in files]
    with torch.inference_mode():
        for s in range(0, len(xs), batch_size):
            vae.encode(torch.stack(xs[s : s + batch_size]))
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=512, help="images to encode per run")
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--shard-size", type=int, default=128)
    ap.add_argument("--actors", type=int, nargs="+", default=[1, 2])
    args = ap.parse_args()

    import ray

    from revq_ray.data.encode import encode_to_shards

    tmp = Path(tempfile.mkdtemp(prefix="revq_encode_bench_"))
    try:
        input_path, spec, what = _inputs(tmp, args.n)
        rows = []
        secs = _direct(input_path, spec, args.n, args.batch_size)
        rows.append({"mode": "direct (1 process, no Ray)", "actors": 0, "items": args.n, "seconds": secs})
        ray.init(
            address="local",
            num_cpus=max(4, os.cpu_count() or 1),
            include_dashboard=False,
            log_to_driver=False,
        )
        ray.data.DataContext.get_current().enable_progress_bars = False
        for k in args.actors:
            t0 = time.perf_counter()
            res = encode_to_shards(
                input_path,
                spec,
                str(tmp / f"out{k}"),
                limit=args.n,
                image_size=64,
                shard_size=args.shard_size,
                batch_size=args.batch_size,
                num_actors=k,
                device="cpu",
                progress=False,
            )
            secs = time.perf_counter() - t0
            assert res.manifest.count == args.n, res.summary()
            rows.append({"mode": f"Ray Data, {k} actor(s)", "actors": k, "items": args.n, "seconds": secs})
        ray.shutdown()
    finally:
        shutil.rmtree(tmp, ignore_errors=True)

    base = rows[0]["items"] / rows[0]["seconds"]
    print(
        f"\nencode throughput: {what}; {args.n} images, batch {args.batch_size}, {os.cpu_count()} CPU cores"
    )
    print(f"{'mode':<30} {'items':>6} {'seconds':>8} {'items/s':>8} {'vs direct':>9}")
    for r in rows:
        r["items_per_s"] = r["items"] / r["seconds"]
        r["ratio_to_direct"] = r["items_per_s"] / base
        ips, ratio = r["items_per_s"], r["ratio_to_direct"]
        print(f"{r['mode']:<30} {r['items']:>6} {r['seconds']:>8.1f} {ips:>8.1f} {ratio:>8.2f}x")
    out = ROOT / "benchmarks/results/encode_throughput.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(
        json.dumps(
            {
                "what": what,
                "n": args.n,
                "batch_size": args.batch_size,
                "shard_size": args.shard_size,
                "cpu_count": os.cpu_count(),
                "platform": platform.platform(),
                "load_avg_1m": os.getloadavg()[0],
                "rows": rows,
                "note": "seconds: wall clock per run, including Ray actor start-up and VAE loading",
            },
            indent=1,
        )
    )
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
