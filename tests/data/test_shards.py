"""Shard writer, manifest and synthetic shards (no Ray needed)."""

from __future__ import annotations

import io
import json
import tarfile

import numpy as np
import pytest
import torch

from revq_ray.core.stats import RunningStats
from revq_ray.data.shards import Manifest, ShardWriter, read_manifest, safe_key, write_shard
from revq_ray.data.synthetic import synthetic_latents, write_synthetic_shards

pytestmark = pytest.mark.data


def _members(path):
    with tarfile.open(path) as tf:
        return {m.name: np.load(io.BytesIO(tf.extractfile(m).read())) for m in tf.getmembers()}


def test_writer_rolls_shards_and_round_trips(tmp_path):
    z = np.random.default_rng(0).standard_normal((10, 2, 3, 3)).astype(np.float32)
    lv = -np.abs(z)
    with ShardWriter(tmp_path, shard_size=4) as w:
        w.write_batch([f"k{i:02d}" for i in range(10)], z, lv)
    assert [s.name for s in w.shards] == ["shard-000000.tar", "shard-000001.tar", "shard-000002.tar"]
    assert [s.count for s in w.shards] == [4, 4, 2]
    m = _members(tmp_path / "shard-000001.tar")
    assert sorted(m) == sorted(
        [f"k{i:02d}.latent.npy" for i in range(4, 8)] + [f"k{i:02d}.logvar.npy" for i in range(4, 8)]
    )
    np.testing.assert_array_equal(m["k05.latent.npy"], z[5])
    np.testing.assert_array_equal(m["k05.logvar.npy"], lv[5])
    assert not list(tmp_path.glob("*.tmp-*"))
    manifest = w.manifest(vae="test:vae")
    manifest.save()
    back = read_manifest(tmp_path)
    assert back == manifest
    assert back.count == 10 and back.has_logvar and back.latent_shape == [2, 3, 3]
    stats = back.running_stats()
    torch.testing.assert_close(stats.mean, torch.from_numpy(z).double().mean(0))
    torch.testing.assert_close(stats.var, torch.from_numpy(z).double().var(0, unbiased=False))


def test_float16_storage_and_stats_of_stored_values(tmp_path):
    z = (np.random.default_rng(1).standard_normal((5, 4)) * 3).astype(np.float32)
    with ShardWriter(tmp_path, shard_size=100, dtype="float16") as w:
        w.write_batch([f"a{i}" for i in range(5)], z)
    m = _members(tmp_path / "shard-000000.tar")
    assert m["a0.latent.npy"].dtype == np.float16
    stats = w.manifest().running_stats()
    torch.testing.assert_close(stats.mean, torch.from_numpy(z.astype(np.float16)).double().mean(0))


def test_crash_leaves_no_shard(tmp_path):
    z = np.zeros((3, 4), np.float32)
    with pytest.raises(RuntimeError), ShardWriter(tmp_path, shard_size=2) as w:
        w.write_batch(["a", "b", "c"], z)  # first shard (a, b) is complete and published
        raise RuntimeError("crash while shard-000001 is half written")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["shard-000000.tar"]


def test_write_shard_is_sorted_and_atomic(tmp_path):
    z = np.arange(12, dtype=np.float32).reshape(3, 4)
    info = write_shard(str(tmp_path), 7, ["c", "a", "b"], z)
    assert info.name == "shard-000007.tar" and info.count == 3
    with tarfile.open(tmp_path / info.name) as tf:
        assert tf.getnames() == ["a.latent.npy", "b.latent.npy", "c.latent.npy"]


def test_bad_keys_and_shapes_are_clear(tmp_path):
    w = ShardWriter(tmp_path)
    with pytest.raises(ValueError, match="no '.'"):
        w.write("img.png", np.zeros(3))
    w.write("a", np.zeros(3))
    with pytest.raises(ValueError, match="latent shape"):
        w.write("b", np.zeros(4))
    with pytest.raises(ValueError, match="duplicate key"):
        w.write("a", np.zeros(3))
    w.abort()
    assert safe_key("cats/img.001.png") == "cats_img_001_png"


def test_missing_manifest_error_names_the_fix(tmp_path):
    with pytest.raises(FileNotFoundError, match="revq_ray.encode"):
        read_manifest(tmp_path / "nope")
    (tmp_path / "manifest.json").write_text(json.dumps({"format": "other"}))
    with pytest.raises(ValueError, match="format"):
        read_manifest(tmp_path)


def test_manifest_over_fsspec_memory_filesystem():
    m = Manifest(count=1, latent_shape=[2], vae="x", stats=RunningStats((2,)).state_dict())
    m.save("memory://h4test/shards")
    assert read_manifest("memory://h4test/shards/manifest.json").vae == "x"


def test_synthetic_shards_have_structure(tmp_path):
    man = write_synthetic_shards(tmp_path, 300, (4, 2, 2), with_logvar=True, shard_size=128, seed=3)
    assert man.count == 300 and [s.count for s in man.shards] == [128, 128, 44] and man.has_logvar
    z, _ = synthetic_latents(300, (4, 2, 2), seed=3)
    # Same items whatever the chunking.
    z_tail, _ = synthetic_latents(10, (4, 2, 2), seed=3, start=290)
    np.testing.assert_array_equal(z[290:], z_tail)
    stats = man.running_stats()
    torch.testing.assert_close(stats.mean.float(), torch.from_numpy(z).mean(0), atol=1e-4, rtol=1e-4)
    # Per-element scales differ (standardization matters) and items cluster (a quantizer can learn them).
    std = stats.std.flatten()
    assert std.max() / std.min() > 2
    flat = (z.reshape(300, -1) - z.reshape(300, -1).mean(0)) / z.reshape(300, -1).std(0)
    d = ((flat[:, None] - flat[None]) ** 2).sum(-1)
    nn = np.sort(d, axis=1)[:, 1]
    assert np.median(nn) < 0.5 * np.median(d)
