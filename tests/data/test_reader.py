"""Streaming latent shards with a real local Ray: columns, validation, split, init samplers."""

from __future__ import annotations

import tracemalloc

import numpy as np
import pytest
import torch

from revq_ray.config import DataConfig
from revq_ray.data.reader import (
    _BottomK,
    latent_dataset,
    sample_init_latents,
    sample_init_tokens,
    train_val_datasets,
)
from revq_ray.data.shards import ShardWriter
from revq_ray.data.synthetic import synthetic_latents, write_synthetic_shards

pytestmark = pytest.mark.data

SHAPE = (4, 2, 2)
N = 600


@pytest.fixture(scope="module")
def shards(tmp_path_factory, ray_local):
    out = tmp_path_factory.mktemp("syn")
    write_synthetic_shards(out, N, SHAPE, with_logvar=True, shard_size=128, seed=0)
    return out


def _all_rows(ds):
    return ds.take_all()


def test_columns_and_round_trip(shards):
    rows = _all_rows(latent_dataset(shards, shuffle_files=True, seed=1))
    assert len(rows) == N and set(rows[0]) == {"latent", "logvar", "key"}
    z, lv = synthetic_latents(N, SHAPE, seed=0)
    for r in rows[:50]:
        i = int(r["key"])
        assert r["latent"].dtype == np.float32 and r["latent"].shape == SHAPE
        np.testing.assert_array_equal(r["latent"], z[i])
        np.testing.assert_array_equal(r["logvar"], lv[i])
    assert sorted(int(r["key"]) for r in rows) == list(range(N))


def test_torch_batches_with_local_shuffle(shards):
    ds = latent_dataset(shards, keys=False)
    seen = 0
    for batch in ds.iter_torch_batches(batch_size=64, local_shuffle_buffer_size=256, local_shuffle_seed=0):
        assert batch["latent"].dtype == torch.float32 and batch["latent"].shape[1:] == SHAPE
        assert set(batch) == {"latent", "logvar"}
        seen += len(batch["latent"])
    assert seen == N


def test_nan_and_shape_errors_name_the_shard(tmp_path, ray_local):
    z = np.zeros((6, 3), np.float32)
    z[4, 1] = np.nan
    with ShardWriter(tmp_path, shard_size=3) as w:
        w.write_batch([f"item{i}" for i in range(6)], z)
    w.manifest().save()
    with pytest.raises(Exception, match=r"shard-000001\.tar.*item4.*NaN"):
        latent_dataset(tmp_path).take_all()
    good = tmp_path / "good"
    with ShardWriter(good, shard_size=3) as w:
        w.write_batch(["a", "b"], np.zeros((2, 3), np.float32))
    m = w.manifest()
    m.latent_shape = [4]
    m.save()
    with pytest.raises(Exception, match=r"shard-000000\.tar.*'a'.*shape \(3,\)"):
        latent_dataset(good).take_all()


def test_train_val_split_is_disjoint_and_deterministic(shards):
    cfg = DataConfig(shards=str(shards), val_items=60)
    train, val = train_val_datasets(cfg, seed=0, keys=True)
    tr = {r["key"] for r in train.take_all()}
    va = {r["key"] for r in val.take_all()}
    assert not tr & va and len(tr | va) == N
    assert 30 <= len(va) <= 90  # about val_items
    train2, val2 = train_val_datasets(cfg, seed=5, keys=True)  # another seed: same hold-out
    assert {r["key"] for r in val2.take_all()} == va
    t, v = train_val_datasets(cfg)  # default: no key column (iter_torch_batches-ready)
    assert set(next(iter(v.iter_torch_batches(batch_size=8)))) == {"latent", "logvar"}
    t0, v0 = train_val_datasets(DataConfig(shards=str(shards), val_items=0))
    assert v0 is None
    t1, v1 = train_val_datasets(DataConfig(shards=str(shards), val_shards=str(shards)))
    assert v1.count() == N
    with pytest.raises(ValueError, match="val_items"):
        train_val_datasets(DataConfig(shards=str(shards), val_items=N))


def test_sample_init_latents_distinct_deterministic_uniform(shards):
    z, _ = synthetic_latents(N, SHAPE, seed=0)
    a = sample_init_latents(shards, 100, seed=0)
    b = sample_init_latents(shards, 100, seed=0)
    c = sample_init_latents(shards, 100, seed=1)
    assert a.shape == (100, *SHAPE) and a.dtype == torch.float32
    torch.testing.assert_close(a, b)
    flat = a.reshape(100, -1).numpy()
    assert len(np.unique(flat, axis=0)) == 100  # without replacement
    # Every sample is a real latent.
    idx = [int(np.argmin(((z.reshape(N, -1) - f) ** 2).sum(1))) for f in flat]
    assert all(np.array_equal(z.reshape(N, -1)[i], f) for i, f in zip(idx, flat))
    assert not torch.equal(a, c)
    # Spread over the whole set (all five shards), not the first ones read.
    assert len({i // 128 for i in idx}) == 5
    assert sample_init_latents(shards, 10 * N).shape[0] == N  # fewer items than asked: all of them


def test_sample_init_tokens_independent_groups(shards):
    t = sample_init_tokens(shards, 8, 50, seed=0)
    assert t.shape == (50, 8, 2)
    z, _ = synthetic_latents(N, SHAPE, seed=0)
    tok = z.reshape(N, 8, 2)
    rows_per_group = []
    for g in range(8):
        ids = [int(np.where((tok[:, g] == v).all(1))[0][0]) for v in t[:, g].numpy()]
        assert len(set(ids)) == 50
        rows_per_group.append(ids)
    # Independent reservoirs: group 0 and group 1 drew (mostly) different latents.
    assert len(set(rows_per_group[0]) & set(rows_per_group[1])) < 25
    with pytest.raises(ValueError, match="divide"):
        sample_init_tokens(shards, 3, 10)


def test_reservoir_memory_is_o_n():
    res = _BottomK(n=16, groups=4)
    rng = np.random.default_rng(0)
    tracemalloc.start()
    for _ in range(200):  # 200 batches x 256 rows x 4 groups x 64 values = 52 MB streamed
        vals = rng.standard_normal((256, 4, 64)).astype(np.float32)
        res.add(rng.integers(0, 2**63, size=(256, 4), dtype=np.uint64), vals)
        assert len(res.prio) == 16
        del vals
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert res.seen == 200 * 256
    assert peak < 2_000_000  # about one batch (256 KB) plus the reservoir, never the stream


def test_bounded_init_sample_reads_few_shards_and_never_the_hold_out(tmp_path):
    """The trainer's codebook-init sample: a bounded read (about n latents, not the dataset), training keys
    only, deterministic, one independent permutation per group; a truncated shard is skipped and counted."""
    import io
    import tarfile

    from revq_ray.data.reader import is_val_key, sample_init_tokens_bounded, val_threshold
    from revq_ray.data.shards import read_manifest

    out = tmp_path / "many"
    write_synthetic_shards(out, 1000, SHAPE, shard_size=50, seed=3)  # 20 shards
    manifest = read_manifest(out)
    thr = val_threshold(manifest.count, 500)  # half held out: a hold-out leak would show
    latents = {}
    for s in manifest.shards:
        with tarfile.open(out / s.name) as tar:
            for m in tar.getmembers():
                if m.name.endswith(".latent.npy"):
                    latents[m.name.split(".")[0]] = np.load(io.BytesIO(tar.extractfile(m).read()))
    train_rows = {tuple(v.reshape(4, -1)[0]) for k, v in latents.items() if not is_val_key(k, thr)}
    tokens, info = sample_init_tokens_bounded(out, 4, 40, seed=1, val_items=500)
    assert tokens.shape == (40, 4, 4) and tokens.dtype == torch.float32
    assert info["shards_read"] <= 4 < len(manifest.shards), info  # ~2 shards of 25 train latents each
    assert {tuple(r) for r in tokens[:, 0].numpy()} <= train_rows
    again, _ = sample_init_tokens_bounded(out, 4, 40, seed=1, val_items=500)
    assert torch.equal(tokens, again)
    other, _ = sample_init_tokens_bounded(out, 4, 40, seed=2, val_items=500)
    assert not torch.equal(tokens, other)
    # groups are permuted independently: row i of group 0 and group 1 come from different latents
    assert not torch.equal(tokens[:, 0], tokens[:, 1])
    # truncated shards (the manifest's size check drops them) are never read, and never crash the sample
    cut = {s.name for s in manifest.shards[::2]}
    for name in cut:
        p = out / name
        p.write_bytes(p.read_bytes()[: p.stat().st_size // 3])
    intact = set()
    for s in manifest.shards:
        if s.name not in cut:
            with tarfile.open(out / s.name) as tar:
                intact |= {m.name.split(".")[0] for m in tar.getmembers()}
    intact_rows = {tuple(latents[k].reshape(4, -1)[0]) for k in intact if not is_val_key(k, thr)}
    # half of the data is left: half the hold-out gives the same hash threshold
    tokens, info = sample_init_tokens_bounded(out, 4, 40, seed=1, val_items=250)
    assert tokens.shape == (40, 4, 4) and info["shards_read"] <= 4, info
    assert {tuple(r) for r in tokens[:, 0].numpy()} <= intact_rows
