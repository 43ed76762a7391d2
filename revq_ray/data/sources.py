"""Inputs of the encode pipeline: list media items on the driver, read and decode them in Ray Data tasks.

Supported inputs (local paths or URIs, through :mod:`revq_ray.data.fs`):

- an image folder (``.png .jpg .jpeg .bmp .webp .gif .tif .tiff``, recursive) or a single image file;
- an audio folder (``.wav .flac .ogg .mp3 .aiff .aif``, recursive) or a single audio file;
- an IDX image file (Fashion-MNIST / MNIST ``*-images-idx3-ubyte[.gz]``): one item per image;
- webdataset tars of raw media (a ``.tar`` file, or a folder of them when it holds no media files directly):
  one item per sample key, using the sample's first image (or audio) member.

Which media a folder yields is decided by the VAE's modality. Items are sorted (path, then index/member),
so the same input always gives the same item list: that is what makes resume work.

Decoding never raises for a bad item: it returns an error string, and the pipeline skips and lists it.
"""

from __future__ import annotations

import gzip
import io
import os
import tarfile
import zlib
from dataclasses import dataclass
from typing import Any

import numpy as np

from revq_ray.data import fs as _fs
from revq_ray.data.shards import safe_key

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".webp", ".gif", ".tif", ".tiff")
AUDIO_EXTENSIONS = (".wav", ".flac", ".ogg", ".mp3", ".aiff", ".aif")
TAR_EXTENSIONS = (".tar",)


@dataclass(frozen=True)
class SourceItem:
    """One input item: a file (``member`` None), image ``member`` of an IDX file, or a member of a tar."""

    uri: str  # path inside ``fs`` (absolute for local files)
    kind: str  # "file", "idx" or "tar"
    member: str | int | None = None

    @property
    def display(self) -> str:
        return self.uri if self.member is None else f"{self.uri}#{self.member}"

    def to_list(self) -> list[Any]:
        return [self.uri, self.kind, self.member]

    @classmethod
    def from_list(cls, data: list[Any]) -> SourceItem:
        return cls(data[0], data[1], data[2])


def is_idx_file(name: str) -> bool:
    base = os.path.basename(name)
    return "idx3" in base and (base.endswith("-ubyte") or base.endswith("-ubyte.gz"))


def _ext(name: str) -> str:
    return os.path.splitext(name)[1].lower()


def media_extensions(modality: str) -> tuple[str, ...]:
    if modality == "image":
        return IMAGE_EXTENSIONS
    if modality == "audio":
        return AUDIO_EXTENSIONS
    raise ValueError(f"modality={modality!r}: expected 'image' or 'audio'")


def _open_idx(fs: Any, path: str):
    stream = fs.open_input_stream(path, compression=None)
    return gzip.GzipFile(fileobj=stream) if path.endswith(".gz") else stream


def idx_header(fs: Any, path: str) -> tuple[int, int, int]:
    """(N, H, W) of an IDX3 unsigned-byte image file; raises ValueError on anything else."""
    with _open_idx(fs, path) as f:
        header = f.read(16)
    if len(header) < 16 or header[:4] != b"\x00\x00\x08\x03":
        raise ValueError(
            f"not an IDX3 unsigned-byte image file (magic {header[:4].hex()}, expected 00000803)"
        )
    n, h, w = (int.from_bytes(header[4 + 4 * i : 8 + 4 * i], "big") for i in range(3))
    return n, h, w


_IDX_CACHE: dict[str, np.ndarray] = {}
_IDX_CACHE_MAX_BYTES = 512 * 2**20


def _read_present(f: Any, nbytes: int, chunk: int = 1 << 20) -> bytes:
    """Up to ``nbytes`` from ``f``; a file (or gzip stream) that ends early gives what it holds."""
    parts: list[bytes] = []
    left = nbytes
    # read1: one decompression step per call, so a gzip stream that breaks off loses nothing decoded before
    read = getattr(f, "read1", f.read)
    while left > 0:
        try:
            got = read(min(left, chunk))
        except (EOFError, OSError, zlib.error):  # gzip cut mid-stream: keep what was decoded before
            break
        if not got:
            break
        parts.append(got)
        left -= len(got)
    return b"".join(parts)


def read_idx_range(fs: Any, path: str, start: int, stop: int) -> np.ndarray:
    """Images ``start:stop`` of an IDX3 file as uint8 (n, H, W).

    A worker process keeps one small file (<= 512 MiB decompressed) cached, so the shard tasks that run
    in the same worker decompress a gzip file once, not once per shard. A truncated file gives the images
    it holds (fewer rows than asked; those past its end are the caller's to report), read once too.
    """
    n, h, w = idx_header(fs, path)
    stop = min(stop, n)
    if path in _IDX_CACHE:
        return _IDX_CACHE[path][start:stop]
    with _open_idx(fs, path) as f:
        if n * h * w <= _IDX_CACHE_MAX_BYTES:
            data = _read_present(f, 16 + n * h * w)[16:]
            m = len(data) // (h * w)
            arr = np.frombuffer(data[: m * h * w], np.uint8).reshape(m, h, w)
            _IDX_CACHE.clear()
            _IDX_CACHE[path] = arr
            return arr[start:stop]
        skipped = len(_read_present(f, 16 + start * h * w, chunk=1 << 24))
        data = _read_present(f, (stop - start) * h * w) if skipped == 16 + start * h * w else b""
    m = len(data) // (h * w)
    return np.frombuffer(data[: m * h * w], np.uint8).reshape(m, h, w)


def _tar_samples(fs: Any, path: str, extensions: tuple[str, ...]) -> list[str]:
    """Member names of ``path`` (one per webdataset sample key, the first with a wanted extension)."""
    chosen: dict[str, str] = {}
    with (
        fs.open_input_stream(path, compression=None) as stream,
        tarfile.open(fileobj=stream, mode="r|*") as tf,
    ):
        for info in tf:
            if not info.isreg():
                continue
            base = info.name.rsplit("/", 1)[-1]
            key = info.name[: len(info.name) - len(base)] + base.split(".", 1)[0]
            if _ext(info.name) in extensions and key not in chosen:
                chosen[key] = info.name
    return sorted(chosen.values())


def item_key(index: int, item: SourceItem, root: str) -> str:
    """The shard key of input item ``index``: its position (unique, sortable) plus a readable name."""
    if item.kind == "idx":
        return f"{index:08d}"
    rel = item.uri[len(root) :].lstrip("/") if item.uri.startswith(root) else os.path.basename(item.uri)
    name = rel if item.kind == "file" else f"{os.path.splitext(rel)[0]}_{item.member}"
    return f"{index:08d}_{safe_key(os.path.splitext(name)[0], 60)}"


def list_sources(
    input_path: str, modality: str, *, limit: int | None = None, filesystem: Any = None
) -> tuple[Any, str, list[SourceItem], list[dict[str, str]]]:
    """-> (pyarrow fs, root path, sorted items, skipped). Unreadable containers are skipped with a reason."""
    import pyarrow.fs as pafs

    fs, root = _fs.resolve(input_path, filesystem)
    info = fs.get_file_info(root)
    if info.type == pafs.FileType.NotFound:
        raise FileNotFoundError(f"--input {input_path!r} does not exist")
    exts = media_extensions(modality)
    if info.type == pafs.FileType.File:
        files, base = [root], os.path.dirname(root)
    else:
        sel = pafs.FileSelector(root, recursive=True)
        files = sorted(i.path for i in fs.get_file_info(sel) if i.type == pafs.FileType.File)
        base = root
    media = [f for f in files if _ext(f) in exts]
    idx = [f for f in files if is_idx_file(f)] if modality == "image" else []
    tars = [f for f in files if _ext(f) in TAR_EXTENSIONS]
    items: list[SourceItem] = [SourceItem(f, "file") for f in media]
    skipped: list[dict[str, str]] = []
    for path in idx:
        try:
            n, _, _ = idx_header(fs, path)
        except (OSError, ValueError, EOFError) as err:
            skipped.append({"path": path, "reason": f"unreadable IDX file: {err}"})
            continue
        items.extend(SourceItem(path, "idx", i) for i in range(n if limit is None else min(n, limit)))
    if not items:  # tars are the input only when nothing else is: a media folder may also hold archives
        for path in tars:
            try:
                items.extend(SourceItem(path, "tar", m) for m in _tar_samples(fs, path, exts))
            except (OSError, tarfile.TarError, EOFError) as err:
                skipped.append({"path": path, "reason": f"unreadable tar: {err}"})
    items.sort(
        key=lambda it: (it.uri, f"{it.member:012d}" if isinstance(it.member, int) else str(it.member or ""))
    )
    if limit is not None:
        items = items[:limit]
    if not items and not skipped:
        raise ValueError(
            f"--input {input_path!r}: no {modality} inputs found (looked for {', '.join(exts)}"
            + (", *-images-idx3-ubyte[.gz]" if modality == "image" else "")
            + " and .tar files of those)"
        )
    return fs, base, items, skipped


# --------------------------------------------------------------------------------------------- decoding
def decode_image(data: bytes, size: int, resize: str = "stretch"):
    """Encoded image bytes -> float (3, size, size) in [0, 1] (gray replicated, alpha dropped); ``resize``:
    ``stretch`` or ``center_crop`` (see :func:`revq_ray.vae.images.resize_square`)."""
    from revq_ray.vae.images import open_image_capped, to_vae_input

    with open_image_capped(io.BytesIO(data), size) as img:  # pixel cap; JPEGs decoded at reduced scale
        return to_vae_input(img, size, resize)


def decode_audio(data: bytes, target_sr: int):
    """Encoded audio bytes -> mono float32 waveform (T,) at ``target_sr`` (as ``vae.audio.load_audio``)."""
    import soundfile as sf
    import torch

    wave, sr = sf.read(io.BytesIO(data), dtype="float32", always_2d=True)
    wave_t = torch.from_numpy(np.ascontiguousarray(wave.mean(axis=1)))
    if sr != target_sr:
        import torchaudio

        wave_t = torchaudio.functional.resample(wave_t, int(sr), int(target_sr))
    return wave_t


def audio_crops(wave, crop_samples: int, min_fraction: float = 0.25) -> list:
    """Non-overlapping fixed-length crops of a waveform (T,), the last one zero-padded (silence).

    A trailing remainder shorter than ``min_fraction`` of a crop is dropped when the clip has at least one
    full crop; a clip shorter than one crop always gives one padded crop. Returns a list of (crop_samples,)
    tensors (empty for an empty clip).
    """
    import torch

    t = int(wave.shape[0])
    if t == 0:
        return []
    starts = list(range(0, t, crop_samples))
    if len(starts) > 1 and t - starts[-1] < min_fraction * crop_samples:
        starts.pop()
    out = []
    for s in starts:
        piece = wave[s : s + crop_samples]
        if piece.shape[0] < crop_samples:
            piece = torch.cat([piece, piece.new_zeros(crop_samples - piece.shape[0])])
        out.append(piece)
    return out


def read_item_bytes(fs: Any, items: list[SourceItem]) -> list[bytes | Exception]:
    """Raw bytes of file / tar items (tars are streamed once each). IDX items are not handled here."""
    out: list[bytes | Exception] = [b""] * len(items)
    by_tar: dict[str, dict[str, int]] = {}
    for i, it in enumerate(items):
        if it.kind == "file":
            try:
                out[i] = _fs.read_bytes(fs, it.uri)
            except Exception as err:  # noqa: BLE001 - any unreadable file is skipped, never fatal
                out[i] = err
        elif it.kind == "tar":
            by_tar.setdefault(it.uri, {})[str(it.member)] = i
    for uri, wanted in by_tar.items():
        try:
            with (
                fs.open_input_stream(uri, compression=None) as stream,
                tarfile.open(fileobj=stream, mode="r|*") as tf,
            ):
                for info in tf:
                    if info.name in wanted:
                        f = tf.extractfile(info)
                        out[wanted.pop(info.name)] = f.read() if f is not None else b""
        except Exception as err:  # noqa: BLE001
            for i in wanted.values():
                out[i] = err
            continue
        for i in wanted.values():
            out[i] = FileNotFoundError("member not found in tar")
    return out
