"""Synthetic latent shards: structured enough for a quantizer to learn, cheap enough for tests and smoke runs.

Each latent is a cluster centre plus noise, then scaled and shifted per element (so per-element
standardization matters, as with real VAE latents): ``z = offset + scale * (centre[c] + noise_std * eps)``.
"""

from __future__ import annotations

import math
import os
from typing import Any

import numpy as np

from revq_ray.data.shards import Manifest, ShardWriter


def synthetic_latents(
    n: int,
    latent_shape: tuple[int, ...] | list[int],
    *,
    seed: int = 0,
    num_clusters: int = 16,
    noise_std: float = 0.5,
    start: int = 0,
) -> tuple[np.ndarray, np.ndarray]:
    """Latents ``start .. start+n-1`` of the synthetic set for ``seed`` (float32, (n, *latent_shape)) and
    matching log-variances. Item i is the same whatever chunk it is generated in."""
    shape = tuple(int(s) for s in latent_shape)
    numel = math.prod(shape)
    g = np.random.default_rng(seed)
    centres = g.standard_normal((num_clusters, numel)).astype(np.float32)
    scale = np.exp(g.uniform(-1.0, 1.0, numel)).astype(np.float32)
    offset = (2.0 * g.standard_normal(numel)).astype(np.float32)
    z = np.empty((n, numel), np.float32)
    lv = np.empty((n, numel), np.float32)
    for j in range(n):
        # One generator per item: item i does not depend on how the set is chunked.
        gi = np.random.default_rng((seed, start + j))
        c = gi.integers(num_clusters)
        z[j] = offset + scale * (centres[c] + noise_std * gi.standard_normal(numel, dtype=np.float32))
        lv[j] = 2.0 * np.log(0.1 * scale) + 0.1 * gi.standard_normal(numel, dtype=np.float32)
    return z.reshape(n, *shape), lv.reshape(n, *shape)


def _require_empty(out_dir: str | os.PathLike, filesystem: Any) -> None:
    """Synthetic latents go only into a missing or empty directory: never over real shards (e.g. those of
    an interrupted encode, which has no manifest yet)."""
    import pyarrow.fs as pafs

    from revq_ray.data import fs as _fs

    fs, root = _fs.resolve(out_dir, filesystem)
    names = sorted(i.base_name for i in fs.get_file_info(pafs.FileSelector(root, allow_not_found=True)))
    if names:
        raise ValueError(
            f"{out_dir} is not empty ({', '.join(names[:3])}{' ...' if len(names) > 3 else ''}): synthetic "
            "latents are written only into a missing or empty directory, never over existing files (an "
            "interrupted encode leaves shards without a manifest: re-run it to finish). Point data.shards "
            "at another directory, or delete this one"
        )


def write_synthetic_shards(
    out_dir: str | os.PathLike,
    n: int,
    latent_shape: tuple[int, ...] | list[int],
    *,
    with_logvar: bool = False,
    seed: int = 0,
    shard_size: int = 256,
    dtype: str = "float32",
    num_clusters: int = 16,
    filesystem: Any = None,
) -> Manifest:
    """Write ``n`` synthetic latents as shards + ``manifest.json`` (vae ``"synthetic"``); returns it.

    Keys are ``00000000``, ``00000001``, ...; ``with_logvar`` adds Gaussian log-variances (for GQ).
    ``out_dir`` must be missing or empty (a ``ValueError`` otherwise): existing data is never overwritten.
    """
    if n < 1:
        raise ValueError(f"n={n}: need at least one latent")
    _require_empty(out_dir, filesystem)
    chunk = 1024
    with ShardWriter(out_dir, shard_size=shard_size, dtype=dtype, filesystem=filesystem) as w:
        for start in range(0, n, chunk):
            m = min(chunk, n - start)
            z, lv = synthetic_latents(m, latent_shape, seed=seed, num_clusters=num_clusters, start=start)
            keys = [f"{start + j:08d}" for j in range(m)]
            w.write_batch(keys, z, lv if with_logvar else None)
    manifest = w.manifest(
        vae="synthetic",
        modality="synthetic",
        source=f"synthetic(seed={seed}, clusters={num_clusters})",
        extra={"seed": seed, "num_clusters": num_clusters},
    )
    manifest.save(out_dir, filesystem=filesystem)
    return manifest
