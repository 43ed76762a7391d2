"""Stream latent shards with Ray Data: training / validation datasets and codebook-init samplers.

Columns of every dataset built here: ``"latent"`` (float32, the manifest's latent shape), ``"logvar"``
(float32, same shape; only when the shards hold log-variances) and ``"key"`` (str; only where stated).

Shuffling is two-level, like every streaming loader: the *file order* is shuffled here (a new order every
epoch, from ``seed``), and a *local shuffle buffer* is applied by the consumer::

    for batch in ds.iter_torch_batches(batch_size=256, local_shuffle_buffer_size=cfg.data.shuffle_buffer):
        z = batch["latent"]                                   # (256, *latent_shape) float32

(in Ray Train: ``ray.train.get_dataset_shard("train").iter_torch_batches(...)`` with the same arguments).
Memory is bounded by the buffer and Ray Data's in-flight blocks, never by the dataset size.
"""

from __future__ import annotations

import hashlib
import io
import logging
import math
import os
import tarfile
import zlib
from typing import TYPE_CHECKING, Any

import numpy as np

from revq_ray.data import fs as _fs
from revq_ray.data.shards import Manifest, read_manifest

log = logging.getLogger(__name__)

if TYPE_CHECKING:  # pragma: no cover
    import ray.data
    import torch

    from revq_ray.config import DataConfig


class LatentDataError(ValueError):
    """A stored latent is unusable (NaN/Inf, wrong shape or dtype); the message names the shard and key."""


# --------------------------------------------------------------------------------------------- decoding
_NPY_MAGIC = b"\x93NUMPY"


class _LatentDecoder:
    """webdataset sample (raw tar members) -> ``{"latent", ["logvar"], ["key"]}`` with validation.

    Runs inside Ray Data's read tasks, once per sample. The ``.npy`` header is parsed once per distinct
    header (every latent of a shard set shares one), then the payload is a zero-parse ``frombuffer``.
    No pickles: object arrays are refused.
    """

    def __init__(self, latent_shape: tuple[int, ...], dtype: str, has_logvar: bool, keys: bool):
        self.latent_shape = tuple(latent_shape)
        self.dtype = np.dtype(dtype)
        self.has_logvar = has_logvar
        self.keys = keys
        self._headers: dict[bytes, tuple[tuple[int, ...], np.dtype, bool]] = {}

    def _fail(self, sample: dict[str, Any], what: str) -> LatentDataError:
        url = str(sample.get("__url__", "?"))
        return LatentDataError(
            f"latent shard {os.path.basename(url)} ({url}), key {sample.get('__key__')!r}: {what}"
        )

    def _npy(self, sample: dict[str, Any], member: str) -> np.ndarray:
        data = sample.get(member)
        if not isinstance(data, bytes | bytearray):
            raise self._fail(
                sample, f"member {member!r} is missing (has {sorted(k for k in sample if k[0] != '_')})"
            )
        if data[:6] != _NPY_MAGIC:
            raise self._fail(sample, f"{member} is not a .npy file")
        start = 10 if data[6] == 1 else 12
        hlen = int.from_bytes(data[8:start], "little")
        header = bytes(data[: start + hlen])
        meta = self._headers.get(header)
        if meta is None:
            buf = io.BytesIO(header)
            version = np.lib.format.read_magic(buf)
            reader = (
                np.lib.format.read_array_header_1_0
                if version == (1, 0)
                else np.lib.format.read_array_header_2_0
            )
            shape, fortran, dtype = reader(buf)
            meta = (tuple(shape), np.dtype(dtype), bool(fortran))
            self._headers[header] = meta
        shape, dtype, fortran = meta
        if shape != self.latent_shape:
            raise self._fail(sample, f"{member} has shape {shape}, the manifest says {self.latent_shape}")
        if dtype != self.dtype:
            raise self._fail(sample, f"{member} has dtype {dtype}, the manifest says {self.dtype}")
        arr = np.frombuffer(data, dtype=dtype, count=math.prod(shape), offset=start + hlen)
        arr = arr.reshape(shape, order="F" if fortran else "C").astype(np.float32)
        if not np.isfinite(arr).all():
            bad = int((~np.isfinite(arr)).sum())
            raise self._fail(sample, f"{member} has {bad} NaN/Inf values (re-encode this shard)")
        return arr

    def __call__(self, sample: dict[str, Any]) -> dict[str, Any]:
        out: dict[str, Any] = {"latent": self._npy(sample, "latent.npy")}
        if self.has_logvar:
            out["logvar"] = self._npy(sample, "logvar.npy")
        if self.keys:
            out["key"] = sample["__key__"]
        return out


def _as_manifest(shards: str | os.PathLike | Manifest, filesystem: Any = None) -> Manifest:
    return shards if isinstance(shards, Manifest) else read_manifest(shards, filesystem)


def latent_dataset(
    shards: str | os.PathLike | Manifest,
    *,
    seed: int = 0,
    shuffle_files: bool = True,
    keys: bool = True,
    filesystem: Any = None,
) -> ray.data.Dataset:
    """A streaming ``ray.data.Dataset`` over the shards listed in ``<shards>/manifest.json``.

    ``shuffle_files`` shuffles the shard order from ``seed`` (a different order on every execution, i.e.
    every epoch). Columns: ``latent`` [, ``logvar``] [, ``key`` if ``keys``]. Every sample is checked
    against the manifest (shape, dtype, finite values); a bad one fails the read with a
    :class:`LatentDataError` naming the shard and key. Note: a ``str`` column cannot go through
    ``iter_torch_batches``' default collate; pass ``keys=False`` (or ``drop_columns(["key"])``) for training.
    """
    import ray.data
    from ray.data import FileShuffleConfig

    manifest = _as_manifest(shards, filesystem)
    if not manifest.shards:
        raise ValueError(f"{manifest.root}: the manifest lists no shards")
    fs, root = _fs.resolve(manifest.root, filesystem)
    paths = [_fs.join(root, s.name) for s in manifest.shards]
    decoder = _LatentDecoder(tuple(manifest.latent_shape), manifest.dtype, manifest.has_logvar, keys)
    return ray.data.read_webdataset(
        paths,
        filesystem=fs,
        decoder=decoder,
        shuffle=FileShuffleConfig(seed=seed) if shuffle_files else None,
        # One read task per shard at most: blocks stay shard-sized and the file shuffle stays meaningful.
        override_num_blocks=len(paths),
    )


# --------------------------------------------------------------------------------------------- split
def _crc32_keys(keys: np.ndarray) -> np.ndarray:
    return np.fromiter((zlib.crc32(str(k).encode()) for k in keys), dtype=np.uint64, count=len(keys))


class _HashSplit:
    """Keep rows whose crc32(key) is below (val) or at/above (train) a threshold; drops the key column."""

    def __init__(self, threshold: int, want_val: bool, keep_keys: bool):
        self.threshold, self.want_val, self.keep_keys = np.uint64(threshold), want_val, keep_keys

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        is_val = _crc32_keys(batch["key"]) < self.threshold
        mask = is_val if self.want_val else ~is_val
        return {k: v[mask] for k, v in batch.items() if self.keep_keys or k != "key"}


def val_threshold(count: int, val_items: int) -> int:
    """The crc32 threshold (out of 2**32) that holds out about ``val_items`` of ``count`` items."""
    if val_items >= count:
        raise ValueError(
            f"data.val_items={val_items} holds out the whole dataset ({count} latents): lower it, or set "
            "data.val_shards to a separate validation set"
        )
    return int(round(val_items / count * 2**32))


def is_val_key(key: str, threshold: int) -> bool:
    """Whether ``key`` falls in the hash hold-out (the same rule :func:`train_val_datasets` applies)."""
    return zlib.crc32(key.encode()) < threshold


def train_val_datasets(
    data_cfg: DataConfig, seed: int = 0, *, keys: bool = False, filesystem: Any = None
) -> tuple[ray.data.Dataset, ray.data.Dataset | None]:
    """``(train_ds, val_ds)`` for ``data_cfg``.

    With ``data_cfg.val_shards`` set, validation reads those shards. Otherwise about ``data_cfg.val_items``
    latents are held out by a stable hash of their key (crc32 below a threshold): deterministic, the same for
    every seed and every run, disjoint from training, and streaming (a filter, no index). ``val_ds`` is
    ``None`` when ``val_items`` is 0 and there are no ``val_shards``. The train set's file order is shuffled
    from ``seed`` each epoch; validation is read in order. Neither has a ``key`` column unless ``keys``.
    The hold-out reads every shard to find its items: ``val_ds.materialize()`` once if you validate often.
    """
    if not data_cfg.shards:
        raise ValueError("data.shards is empty: set it to a directory written by `python -m revq_ray.encode`")
    manifest = read_manifest(data_cfg.shards, filesystem)
    if data_cfg.val_shards:
        val_manifest = read_manifest(data_cfg.val_shards, filesystem)
        if val_manifest.latent_shape != manifest.latent_shape:
            raise ValueError(
                f"data.val_shards latent shape {val_manifest.latent_shape} != data.shards latent shape "
                f"{manifest.latent_shape}: encode both with the same VAE and size"
            )
        train = latent_dataset(manifest, seed=seed, shuffle_files=True, keys=keys, filesystem=filesystem)
        val = latent_dataset(val_manifest, shuffle_files=False, keys=keys, filesystem=filesystem)
        return train, val
    train = latent_dataset(manifest, seed=seed, shuffle_files=True, keys=True, filesystem=filesystem)
    if data_cfg.val_items == 0:
        return (train if keys else train.drop_columns(["key"])), None
    threshold = val_threshold(manifest.count, data_cfg.val_items)
    val = latent_dataset(manifest, shuffle_files=False, keys=True, filesystem=filesystem)
    train = train.map_batches(_HashSplit(threshold, False, keys), batch_format="numpy", batch_size=None)
    val = val.map_batches(_HashSplit(threshold, True, keys), batch_format="numpy", batch_size=None)
    return train, val


# --------------------------------------------------------------------------------------------- sampling
_GOLDEN = np.uint64(0x9E3779B97F4A7C15)


def _splitmix64(x: np.ndarray) -> np.ndarray:
    """A strong 64-bit mixer (vectorized; uint64 arithmetic wraps)."""
    with np.errstate(over="ignore"):
        z = x + _GOLDEN
        z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        return z ^ (z >> np.uint64(31))


def _key_hashes(keys: np.ndarray, seed: int) -> np.ndarray:
    salt = int(seed).to_bytes(8, "little", signed=False)
    return np.fromiter(
        (
            int.from_bytes(hashlib.blake2b(str(k).encode(), digest_size=8, salt=salt).digest(), "little")
            for k in keys
        ),
        dtype=np.uint64,
        count=len(keys),
    )


class _BottomK:
    """Per-group reservoir: keeps, for each of G groups, the n rows with the smallest random priority.

    Giving every item an i.i.d. uniform priority and keeping the n smallest is a uniform sample without
    replacement (a priority reservoir). Priorities come from a keyed hash of each item's key, so the result
    does not depend on the order blocks arrive in. Memory: O(n * G * d) plus one batch.
    """

    def __init__(self, n: int, groups: int):
        self.n, self.groups = n, groups
        self.prio: np.ndarray | None = None  # (m, G) uint64
        self.vals: np.ndarray | None = None  # (m, G, d) float32
        self.seen = 0

    def add(self, prio_bg: np.ndarray, vals_bgd: np.ndarray) -> None:
        self.seen += len(prio_bg)
        if self.prio is not None:
            prio_bg = np.concatenate([self.prio, prio_bg])
            vals_bgd = np.concatenate([self.vals, vals_bgd])
        if len(prio_bg) > self.n:
            idx = np.argpartition(prio_bg, self.n - 1, axis=0)[: self.n]  # (n, G)
            prio_bg = np.take_along_axis(prio_bg, idx, axis=0)
            vals_bgd = np.take_along_axis(vals_bgd, idx[:, :, None], axis=0)
        self.prio, self.vals = prio_bg, np.ascontiguousarray(vals_bgd)

    def result(self) -> np.ndarray:
        if self.prio is None:
            raise ValueError("no latents to sample from: the dataset is empty")
        order = np.argsort(self.prio, axis=0)
        return np.take_along_axis(self.vals, order[:, :, None], axis=0)


def _sample_groups(
    shards: str | os.PathLike | Manifest | ray.data.Dataset,
    groups: int,
    n: int,
    seed: int,
    filesystem: Any,
    batch_size: int = 1024,
) -> tuple[np.ndarray, tuple[int, ...]]:
    import ray.data

    if n < 1:
        raise ValueError(f"n={n}: sample at least one latent")
    if isinstance(shards, ray.data.Dataset):
        ds = shards
        cols = ds.columns() or []
        ds = ds.select_columns([c for c in ("latent", "key") if c in cols])
    else:
        ds = latent_dataset(shards, shuffle_files=False, keys=True, filesystem=filesystem)
        ds = ds.select_columns(["latent", "key"])
    group_ids = np.arange(groups, dtype=np.uint64)[None, :] * _GOLDEN
    res = _BottomK(n, groups)
    shape: tuple[int, ...] = ()
    for i, batch in enumerate(ds.iter_batches(batch_size=batch_size, batch_format="numpy")):
        z = batch["latent"]
        b, shape = len(z), tuple(z.shape[1:])
        if math.prod(shape) % groups:
            raise ValueError(f"layout_tokens={groups} does not divide the latent size of {shape}")
        if "key" in batch:
            h = _key_hashes(batch["key"], seed)[:, None]  # (B, 1)
        else:
            # No keys: seeded random priorities (uniform, but the result then depends on block order).
            h = np.random.default_rng([seed, i]).integers(0, 2**63, size=(b, 1), dtype=np.uint64)
        prio = _splitmix64(h ^ group_ids) if groups > 1 else h
        res.add(prio, z.reshape(b, groups, -1).astype(np.float32, copy=False))
    return res.result(), shape


def sample_init_latents(
    shards: str | os.PathLike | Manifest | ray.data.Dataset,
    n: int,
    *,
    seed: int = 0,
    filesystem: Any = None,
) -> torch.Tensor:
    """``n`` latents drawn uniformly without replacement from the stream -> (n, *latent_shape) float32.

    One streaming pass, memory O(n) latents (a priority reservoir), deterministic for ``seed`` whatever
    order blocks arrive in (priorities hash each item's key). ``shards`` is a shard directory/URI, a
    :class:`Manifest`, or a dataset with a ``latent`` column (and ideally ``key``). Returns fewer than ``n``
    rows when the data holds fewer items.
    """
    import torch

    out, shape = _sample_groups(shards, 1, n, seed, filesystem)  # (m, 1, numel)
    return torch.from_numpy(out.reshape(len(out), *shape))


def sample_init_tokens(
    shards: str | os.PathLike | Manifest | ray.data.Dataset,
    layout_tokens: int,
    n: int,
    seed: int = 0,
    *,
    filesystem: Any = None,
) -> torch.Tensor:
    """Per-group codebook init: for each of ``layout_tokens`` groups, ``n`` tokens drawn without replacement
    from an independent reservoir -> (n, T, d) float32 (unstandardized; d = latent numel / T).

    Row i of group g and row i of group h come from different (independent) latents, unlike slicing
    :func:`sample_init_latents`. One streaming pass, memory O(n * T * d) (= n latents). Fewer than ``n``
    rows when the data holds fewer items.
    """
    import torch

    if layout_tokens < 1:
        raise ValueError(f"layout_tokens={layout_tokens}: need at least one token per latent")
    if isinstance(shards, str | os.PathLike | Manifest):
        numel = math.prod(_as_manifest(shards, filesystem).latent_shape)
        if numel % layout_tokens:
            raise ValueError(f"layout_tokens={layout_tokens} does not divide the latent size {numel}")
    return torch.from_numpy(_sample_groups(shards, layout_tokens, n, seed, filesystem)[0])


# --------------------------------------------------------------------------------------------- bounded init
def _read_shard_latents(
    fs: Any, path: str, decoder: _LatentDecoder, threshold: int | None
) -> tuple[list[np.ndarray], int, int]:
    """The training latents of one tar shard (hold-out keys dropped), how many members were unusable, and how
    many latent members the shard held in all (fewer than the manifest says: the shard was cut short)."""
    out: list[np.ndarray] = []
    bad = seen = 0
    with fs.open_input_stream(path, compression=None) as f, tarfile.open(fileobj=f, mode="r|") as tar:
        for member in tar:
            base = os.path.basename(member.name)
            key, _, ext = base.partition(".")
            if ext != "latent.npy" or not member.isfile():
                continue
            seen += 1
            if threshold is not None and is_val_key(key, threshold):
                continue
            data = tar.extractfile(member).read()  # type: ignore[union-attr]
            try:
                out.append(decoder._npy({"__key__": key, "__url__": path, "latent.npy": data}, "latent.npy"))
            except LatentDataError:
                bad += 1
    return out, bad, seen


def sample_init_tokens_bounded(
    shards: str | os.PathLike | Manifest,
    layout_tokens: int,
    n: int,
    seed: int = 0,
    *,
    val_items: int = 0,
    filesystem: Any = None,
    to_tokens: Any = None,
) -> tuple[torch.Tensor, dict[str, int]]:
    """Codebook-init tokens from a *bounded* number of shards: ``(tokens_ntd, info)``.

    ``to_tokens``: (m, *latent_shape) -> (m, G, d) array, the model's token layout when it is not the
    contiguous one (default: a contiguous reshape).

    Shards are visited in a seeded random order and read whole (no Ray Data, no pass over the dataset) until
    they hold ``n`` training latents, so the cost is about ``n`` latents however large the dataset is: seconds
    where :func:`sample_init_tokens` streams everything. Each of the ``layout_tokens`` groups then takes its
    own seeded permutation of those latents, so row i of two groups comes from different latents. Latents in
    the hash hold-out of ``val_items`` (see :func:`train_val_datasets`) are never used; unreadable members
    and shards are skipped and counted, shards holding fewer latents than the manifest lists are counted as
    short. Deterministic for ``seed``. ``info``: shards read, latents read, members and shards skipped,
    shards short.
    """
    import torch

    if layout_tokens < 1 or n < 1:
        raise ValueError(f"layout_tokens={layout_tokens}, n={n}: need at least one token and one sample")
    manifest = _as_manifest(shards, filesystem)
    numel = math.prod(manifest.latent_shape)
    if numel % layout_tokens:
        raise ValueError(f"layout_tokens={layout_tokens} does not divide the latent size {numel}")
    fs, _ = _fs.resolve(manifest.root or ".", filesystem)
    threshold = val_threshold(manifest.count, val_items) if val_items else None
    decoder = _LatentDecoder(tuple(manifest.latent_shape), manifest.dtype, False, False)
    order = np.random.default_rng([seed, 0x1A17]).permutation(len(manifest.shards))
    latents: list[np.ndarray] = []
    info = {"shards_read": 0, "latents": 0, "members_skipped": 0, "shards_skipped": 0, "shards_short": 0}
    for i in order:
        if len(latents) >= n:
            break
        path = _fs.resolve(_fs.join(manifest.root, manifest.shards[i].name), filesystem)[1]
        try:
            got, bad, seen = _read_shard_latents(fs, path, decoder, threshold)
        except (OSError, EOFError, tarfile.TarError) as err:  # a corrupt shard
            log.warning("codebook init: shard %s unreadable (%s); skipped", path, err)
            info["shards_skipped"] += 1
            continue
        if seen < manifest.shards[i].count:  # cut short between members: use what is there, say so
            log.warning(
                "codebook init: shard %s holds %d of %d latents", path, seen, manifest.shards[i].count
            )
            info["shards_short"] += 1
        latents.extend(got)
        info["shards_read"] += 1
        info["members_skipped"] += bad
    if not latents:
        raise ValueError(f"no readable training latents for codebook init in {manifest.root or shards}")
    z = np.stack(latents)
    z = z.reshape(len(z), layout_tokens, -1) if to_tokens is None else to_tokens(z)  # (m, G, d)
    info["latents"] = m = len(z)
    take = min(n, m)
    rng = np.random.default_rng([seed, 0x7E57])
    idx = np.stack([rng.permutation(m)[:take] for _ in range(layout_tokens)], axis=1)  # (take, G)
    out = np.take_along_axis(z, idx[:, :, None], axis=0)
    return torch.from_numpy(np.ascontiguousarray(out, dtype=np.float32)), info
