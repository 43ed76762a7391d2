"""Latent shards on disk: webdataset tars plus a ``manifest.json``.

Layout of a shard directory (local path or URI)::

    manifest.json            Manifest: count, latent shape, dtype, VAE spec, shard list, skipped inputs, stats
    shard-000000.tar         <key>.latent.npy [+ <key>.logvar.npy] per item, members sorted by key
    shard-000001.tar
    ...

A shard is written under a temporary name and moved into place only when complete, and the manifest is
written last: a crash leaves at worst a stray ``*.tmp-*`` file that no reader lists. Readers take the shard
list from the manifest, never from a directory listing.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import re
import sys
import tarfile
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from revq_ray.core.stats import RunningStats
from revq_ray.data import fs as _fs

MANIFEST_NAME = "manifest.json"
FORMAT = "revq-ray-latents/1"
DTYPES = ("float32", "float16")
# A webdataset key is everything before the first "." of the member's base name, so keys must not contain
# dots; "/" would create folders inside the tar. Keep keys to a safe, portable alphabet.
_KEY_RE = re.compile(r"^[A-Za-z0-9_\-]+$")


def shard_name(index: int) -> str:
    return f"shard-{index:06d}.tar"


def check_key(key: str) -> str:
    if not isinstance(key, str) or not _KEY_RE.match(key):
        raise ValueError(f"latent key {key!r}: use only letters, digits, '_' and '-' (no '.', '/' or spaces)")
    return key


def safe_key(text: str, max_len: int = 80) -> str:
    """Map any string (e.g. a relative file path) to a valid shard key."""
    out = re.sub(r"[^A-Za-z0-9_\-]+", "_", text).strip("_")
    return out[-max_len:] or "item"


def _npy_bytes(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, np.ascontiguousarray(arr), allow_pickle=False)
    return buf.getvalue()


class _HashingWriter:
    """Forwards writes to a stream while counting bytes and hashing them (sha256 recorded per shard)."""

    def __init__(self, stream: Any):
        self.stream, self.size, self.sha = stream, 0, hashlib.sha256()

    def write(self, data: bytes) -> int:
        self.sha.update(data)
        self.size += len(data)
        return self.stream.write(data)


class _TarShard:
    """One shard being written: a temporary file that becomes ``shard-XXXXXX.tar`` on :meth:`commit`."""

    def __init__(self, fs: Any, root: str, index: int):
        self.fs, self.index = fs, index
        self.name = shard_name(index)
        self.path = _fs.join(root, self.name)
        self.tmp_path = f"{self.path}.tmp-{os.getpid()}-{os.urandom(4).hex()}"
        self._stream = fs.open_output_stream(self.tmp_path)
        self._hashed = _HashingWriter(self._stream)
        # Stream mode ("w|"): no seeking, so it works on object stores too.
        self._tar = tarfile.open(fileobj=self._hashed, mode="w|", format=tarfile.USTAR_FORMAT)  # noqa: SIM115
        self.count = 0

    def _add(self, name: str, data: bytes) -> None:
        info = tarfile.TarInfo(name)
        info.size = len(data)
        info.mode = 0o644
        info.mtime = 0  # byte-identical shards for identical content
        self._tar.addfile(info, io.BytesIO(data))

    def add(self, key: str, latent: np.ndarray, logvar: np.ndarray | None) -> None:
        self._add(f"{key}.latent.npy", _npy_bytes(latent))
        if logvar is not None:
            self._add(f"{key}.logvar.npy", _npy_bytes(logvar))
        self.count += 1

    def commit(self) -> ShardInfo:
        self._tar.close()
        self._stream.close()
        self.fs.move(self.tmp_path, self.path)
        return ShardInfo(self.name, self.count, self._hashed.size, self._hashed.sha.hexdigest())

    def abort(self) -> None:
        try:
            self._tar.close()
            self._stream.close()
        finally:
            if _fs.exists(self.fs, self.tmp_path):
                self.fs.delete_file(self.tmp_path)


def write_shard(
    out_dir: str,
    index: int,
    keys: list[str],
    latents: np.ndarray,
    logvars: np.ndarray | None = None,
    *,
    dtype: str = "float32",
    filesystem: Any = None,
) -> ShardInfo:
    """Write one complete shard ``shard-{index:06d}.tar`` atomically from (N, *latent_shape) arrays."""
    if dtype not in DTYPES:
        raise ValueError(f"dtype={dtype!r}: choose one of {DTYPES}")
    fs, root = _fs.resolve(out_dir, filesystem)
    _fs.makedirs(fs, root)
    order = np.argsort(np.asarray(keys, dtype=object), kind="stable")
    shard = _TarShard(fs, root, index)
    try:
        for i in order:
            lv = None if logvars is None else logvars[i].astype(dtype)
            shard.add(check_key(keys[i]), latents[i].astype(dtype), lv)
        return shard.commit()
    except BaseException:
        shard.abort()
        raise


@dataclass
class ShardInfo:
    """One shard of a manifest: file name, latents in it, and (manifests written since they were added;
    0 / "" in older ones) its size in bytes and sha256, which readers check."""

    name: str
    count: int
    size: int = 0
    sha256: str = ""


@dataclass
class Manifest:
    """What a shard directory holds. Saved as ``manifest.json``; load with :func:`read_manifest`.

    ``stats`` is a :meth:`RunningStats.state_dict` of per-element latent statistics over every stored latent
    (as stored, i.e. after any float16 rounding): fit a ``Standardizer`` from :meth:`running_stats` with no
    pass over the data.
    """

    count: int
    latent_shape: list[int]
    dtype: str = "float32"
    has_logvar: bool = False
    vae: str = ""
    shards: list[ShardInfo] = field(default_factory=list)
    skipped: list[dict[str, str]] = field(default_factory=list)
    stats: dict[str, Any] | None = None
    modality: str = ""
    source: str = ""
    input_shape: list[int] | None = None
    extra: dict[str, Any] = field(default_factory=dict)
    format: str = FORMAT
    # Where the manifest was read from / saved to (not serialized): shard paths are relative to it.
    root: str = field(default="", compare=False, repr=False)
    # Shards dropped on read because they are missing or damaged (not serialized): {"path", "reason"}.
    bad_shards: list[dict[str, str]] = field(default_factory=list, compare=False, repr=False)

    def __post_init__(self) -> None:
        self.latent_shape = [int(s) for s in self.latent_shape]
        self.shards = [s if isinstance(s, ShardInfo) else ShardInfo(**s) for s in self.shards]
        if self.dtype not in DTYPES:
            raise ValueError(f"manifest dtype={self.dtype!r}: expected one of {DTYPES}")

    @property
    def num_skipped(self) -> int:
        return len(self.skipped)

    def running_stats(self) -> RunningStats:
        if self.stats is None:
            raise ValueError(f"manifest at {self.root or '?'} has no statistics (written without stats)")
        return RunningStats.from_state_dict(self.stats)

    def shard_uris(self) -> list[str]:
        """Shard locations as given by ``root`` (a path or URI)."""
        return [_fs.join(self.root, s.name) for s in self.shards]

    def to_dict(self) -> dict[str, Any]:
        if self.bad_shards:
            raise ValueError(
                f"manifest of {self.root}: shards were dropped on read ({len(self.bad_shards)} damaged); "
                "saving it would forget them: re-encode instead"
            )
        d = asdict(self)
        d.pop("root")
        d.pop("bad_shards")
        return d

    @classmethod
    def from_dict(cls, data: dict[str, Any], root: str = "") -> Manifest:
        data = dict(data)
        fmt = data.get("format", "")
        if fmt != FORMAT:
            raise ValueError(f"manifest at {root or '?'}: format {fmt!r} is not {FORMAT!r}")
        return cls(**data, root=root)

    def save(self, out_dir: str | os.PathLike | None = None, filesystem: Any = None) -> str:
        """Write ``manifest.json`` atomically into ``out_dir`` (default: ``root``); returns its location."""
        where = str(out_dir) if out_dir is not None else self.root
        if not where:
            raise ValueError("Manifest.save: pass out_dir (the shard directory)")
        fs, root = _fs.resolve(where, filesystem)
        _fs.makedirs(fs, root)
        _fs.write_bytes_atomic(
            fs, _fs.join(root, MANIFEST_NAME), json.dumps(self.to_dict(), indent=1).encode()
        )
        self.root = where
        return _fs.join(where, MANIFEST_NAME)


def read_manifest(path_or_uri: str | os.PathLike, filesystem: Any = None, *, verify: bool = True) -> Manifest:
    """Load ``manifest.json`` from a shard directory (or the file itself), local or remote.

    With ``verify`` (default) every listed shard must exist with the size the manifest recorded; the others
    are dropped from the result, counted in ``bad_shards`` and warned about (see :func:`check_shards`)."""
    where = str(path_or_uri)
    if not where:
        raise FileNotFoundError(
            "data.shards is empty: point it at a directory written by `python -m revq_ray.encode` "
            "(or revq_ray.data.write_synthetic_shards)"
        )
    root = where[: -len(MANIFEST_NAME) - 1] if where.endswith("/" + MANIFEST_NAME) else where
    fs, path = _fs.resolve(root, filesystem)
    mpath = _fs.join(path, MANIFEST_NAME)
    if not _fs.is_file(fs, mpath):
        raise FileNotFoundError(
            f"no {MANIFEST_NAME} in {root!r}: it is not a finished latent-shard directory. Write one with "
            f"`python -m revq_ray.encode --input MEDIA --vae SPEC --output {root}` (an interrupted encode "
            "writes the manifest only when it completes: re-run it to resume)"
        )
    try:
        data = json.loads(_fs.read_bytes(fs, mpath))
    except json.JSONDecodeError as err:
        raise ValueError(f"{mpath}: corrupt manifest ({err})") from None
    manifest = Manifest.from_dict(data, root=root)
    return drop_bad_shards(manifest, check_shards(manifest, filesystem)) if verify else manifest


def _sha256_of(fs: Any, path: str) -> str:
    h = hashlib.sha256()
    with fs.open_input_stream(path, compression=None) as f:
        while chunk := f.read(1 << 22):
            h.update(chunk)
    return h.hexdigest()


def check_shards(manifest: Manifest, filesystem: Any = None, *, deep: bool = False) -> list[dict[str, str]]:
    """Problems of the shards a manifest lists: missing, or another size than recorded (a truncated or
    rewritten shard); with ``deep`` also another sha256 (reads every shard). One directory listing unless
    ``deep``. Returns ``[{"path": shard name, "reason": ...}]``; shards of older manifests (no size) are
    only checked for presence."""
    import pyarrow.fs as pafs

    fs, root = _fs.resolve(manifest.root, filesystem)
    listing = {i.base_name: i.size for i in fs.get_file_info(pafs.FileSelector(root, allow_not_found=True))}
    bad = []
    for s in manifest.shards:
        size = listing.get(s.name)
        if size is None:
            reason = "missing"
        elif s.size and size != s.size:
            reason = f"{size} bytes, the manifest says {s.size} (truncated or rewritten)"
        elif deep and s.sha256 and _sha256_of(fs, _fs.join(root, s.name)) != s.sha256:
            reason = "sha256 differs from the manifest's (damaged or rewritten)"
        else:
            continue
        bad.append({"path": s.name, "reason": f"shard {reason}: its {s.count} latents are skipped"})
    return bad


def drop_bad_shards(manifest: Manifest, bad: list[dict[str, str]]) -> Manifest:
    """``manifest`` without the shards in ``bad`` (count lowered; listed in ``bad_shards``); says so."""
    if not bad:
        return manifest
    names = {b["path"] for b in bad}
    kept = [s for s in manifest.shards if s.name not in names]
    lost = sum(s.count for s in manifest.shards if s.name in names)
    print(
        f"[revq_ray.data] WARNING {manifest.root}: {len(bad)} of {len(manifest.shards)} shards are damaged "
        f"and skipped ({lost} latents), e.g. {bad[0]['path']}: {bad[0]['reason']}. Re-run the encode to "
        "repair them",
        file=sys.stderr,
        flush=True,
    )
    out = Manifest.from_dict(manifest.to_dict(), root=manifest.root)
    out.shards, out.count, out.bad_shards = kept, manifest.count - lost, list(bad)
    return out


class ShardWriter:
    """Streams latents into rolling webdataset shards ``shard-000000.tar``, ``shard-000001.tar``, ...

    Each shard holds ``shard_size`` items (the last one fewer); members are ``<key>.latent.npy`` and, for
    Gaussian VAEs, ``<key>.logvar.npy``, stored as ``dtype`` (float32 or float16). Per-element statistics
    of the stored latents are accumulated as they are written (``track_stats``). Use as a context manager;
    on an exception the shard in progress is discarded, never published::

        with ShardWriter(out_dir, shard_size=1024) as w:
            for key, z in items:
                w.write(key, z)
        manifest = w.manifest(vae="taesd:...")
        manifest.save()
    """

    def __init__(
        self,
        out_dir: str | os.PathLike,
        *,
        shard_size: int = 1024,
        dtype: str = "float32",
        start_index: int = 0,
        filesystem: Any = None,
        track_stats: bool = True,
    ):
        if shard_size < 1:
            raise ValueError(f"shard_size={shard_size}: must be >= 1")
        if dtype not in DTYPES:
            raise ValueError(f"dtype={dtype!r}: choose one of {DTYPES}")
        self.out_dir = str(out_dir)
        self.fs, self.root = _fs.resolve(self.out_dir, filesystem)
        _fs.makedirs(self.fs, self.root)
        self.shard_size, self.dtype = shard_size, dtype
        self.track_stats = track_stats
        self._next_index = start_index
        self._current: _TarShard | None = None
        self.shards: list[ShardInfo] = []
        self.count = 0
        self.latent_shape: tuple[int, ...] | None = None
        self.has_logvar: bool | None = None
        self.stats: RunningStats | None = None
        self._keys_in_shard: set[str] = set()
        self._pending: list[np.ndarray] = []

    def write(self, key: str, latent: np.ndarray, logvar: np.ndarray | None = None) -> None:
        """Add one item (``latent`` of the latent shape; ``logvar`` too, or None)."""
        check_key(key)
        latent = np.asarray(latent)
        if self.latent_shape is None:
            self.latent_shape = tuple(latent.shape)
            self.has_logvar = logvar is not None
            if self.track_stats:
                self.stats = RunningStats(self.latent_shape)
        if tuple(latent.shape) != self.latent_shape:
            raise ValueError(
                f"key {key!r}: latent shape {tuple(latent.shape)} != first item's {self.latent_shape}"
            )
        if (logvar is not None) != self.has_logvar:
            raise ValueError(f"key {key!r}: every item needs a logvar or none does (first item decided)")
        if logvar is not None and tuple(np.shape(logvar)) != self.latent_shape:
            raise ValueError(
                f"key {key!r}: logvar shape {np.shape(logvar)} != latent shape {self.latent_shape}"
            )
        if self._current is None:
            self._current = _TarShard(self.fs, self.root, self._next_index)
            self._next_index += 1
            self._keys_in_shard = set()
        if key in self._keys_in_shard:
            raise ValueError(f"duplicate key {key!r} in {self._current.name}")
        self._keys_in_shard.add(key)
        z = latent.astype(self.dtype)
        self._current.add(key, z, None if logvar is None else np.asarray(logvar).astype(self.dtype))
        if self.stats is not None:
            # Stats of what is stored (after any float16 rounding), so they match what readers see;
            # updated in chunks because a per-item update is dominated by call overhead.
            self._pending.append(z)
            if len(self._pending) >= 256:
                self._flush_stats()
        self.count += 1
        if self._current.count >= self.shard_size:
            self._roll()

    def _flush_stats(self) -> None:
        if self._pending and self.stats is not None:
            import torch

            self.stats.update(torch.from_numpy(np.stack(self._pending).astype(np.float32)))
        self._pending = []

    def write_batch(self, keys: list[str], latents: np.ndarray, logvars: np.ndarray | None = None) -> None:
        for i, key in enumerate(keys):
            self.write(key, latents[i], None if logvars is None else logvars[i])

    def _roll(self) -> None:
        if self._current is not None:
            self.shards.append(self._current.commit())
            self._current = None

    def close(self) -> list[ShardInfo]:
        """Publish the last partial shard; returns every shard written."""
        self._flush_stats()
        self._roll()
        return self.shards

    def abort(self) -> None:
        if self._current is not None:
            self._current.abort()
            self._current = None

    def __enter__(self) -> ShardWriter:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()

    def manifest(self, **fields: Any) -> Manifest:
        """A :class:`Manifest` for what was written (``fields`` fill vae, skipped, modality, source, ...)."""
        self._flush_stats()
        if self.latent_shape is None:
            raise ValueError(f"nothing was written to {self.out_dir}: no latents")
        return Manifest(
            count=self.count,
            latent_shape=list(self.latent_shape),
            dtype=self.dtype,
            has_logvar=bool(self.has_logvar),
            shards=list(self.shards),
            stats=None if self.stats is None else self.stats.state_dict(),
            root=self.out_dir,
            **fields,
        )
