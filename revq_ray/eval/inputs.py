"""What an evaluation reads: latent shards (a manifest directory) or raw media (images, IDX, audio)."""

from __future__ import annotations

import io
import os
import tarfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from revq_ray.runtime import is_uri


@dataclass
class EvalInput:
    """The evaluation set, as one of: latents (+ logvars), images (N, 3, S, S) in [0, 1], or waveforms."""

    kind: str  # "latents" | "images" | "audio"
    source: str
    latents: torch.Tensor | None = None
    logvars: torch.Tensor | None = None
    images: list[Any] | None = None  # raw images (HxW / HxWx3 uint8 arrays), resized by the tokenizer
    waves: list[torch.Tensor] | None = None
    sample_rates: list[int] | None = None
    names: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    vae_spec: str = ""  # the VAE the shards were written with (manifest), if known

    def __len__(self) -> int:
        for x in (self.latents, self.images, self.waves):
            if x is not None:
                return len(x)
        return 0


def _is_idx(path: Path) -> bool:
    name = path.name.lower()
    return path.is_file() and ("idx3" in name or name.endswith("-ubyte") or name.endswith("-ubyte.gz"))


def detect_kind(path: str | os.PathLike) -> str:
    """ "latents", "idx", "images" or "audio" for an input path; raises naming what was expected."""
    from revq_ray.vae.audio import AUDIO_EXTENSIONS
    from revq_ray.vae.images import IMAGE_EXTENSIONS

    p = Path(path)
    if is_uri(path) or (p.is_dir() and (p / "manifest.json").is_file()):
        return "latents"
    if p.is_file() and p.name == "manifest.json":
        return "latents"
    if _is_idx(p):
        return "idx"
    if p.is_file():
        if p.suffix.lower() in IMAGE_EXTENSIONS:
            return "images"
        if p.suffix.lower() in AUDIO_EXTENSIONS:
            return "audio"
    if p.is_dir():
        n_img = n_aud = 0
        for f in p.rglob("*"):
            suf = f.suffix.lower()
            n_img += suf in IMAGE_EXTENSIONS
            n_aud += suf in AUDIO_EXTENSIONS
            if n_img + n_aud >= 64:
                break
        if n_img or n_aud:
            return "images" if n_img >= n_aud else "audio"
        if any(p.glob("*.tar")):
            raise FileNotFoundError(
                f"{p}: has .tar shards but no manifest.json (an unfinished encode?); re-run `revq-ray encode`"
            )
    raise FileNotFoundError(
        f"--input {str(path)!r}: expected a latent-shard directory (with manifest.json), an IDX image file "
        "(*-idx3-ubyte[.gz]), an image folder/file (.png/.jpg/...) or an audio folder/file (.wav/.flac/...)"
    )


class _DamagedShard(ValueError):
    """A shard read to its end differs from the manifest (member count or sha256)."""


class _Sha:
    """A read stream that hashes what passes through it."""

    def __init__(self, raw: Any):
        import hashlib

        self.raw, self.sha = raw, hashlib.sha256()

    def read(self, n: int = -1) -> bytes:
        data = self.raw.read(n)
        self.sha.update(data)
        return data


def _check_shard(stream: _Sha, info: Any, count: int) -> None:
    while stream.read(1 << 20):  # the tar's end padding, which tarfile leaves unread
        pass
    if count != info.count:
        raise _DamagedShard(f"{count} latents, the manifest says {info.count}")
    if info.sha256 and stream.sha.hexdigest() != info.sha256:
        raise _DamagedShard("sha256 differs from the manifest's (damaged or rewritten)")


def read_latents(shards: str | os.PathLike, limit: int | None = None) -> EvalInput:
    """The first ``limit`` latents (and logvars, when stored) of a shard directory, in manifest order.

    Unreadable members are skipped and counted (``skipped``), never fatal.
    """
    from revq_ray.data import fs as _fs
    from revq_ray.data.shards import read_manifest

    manifest = read_manifest(str(shards))  # drops (and lists in bad_shards) missing or truncated shards
    fs, _ = _fs.resolve(manifest.root)
    latents: dict[str, np.ndarray] = {}
    logvars: dict[str, np.ndarray] = {}
    order: list[str] = []
    skipped: list[str] = [f"{b['path']}: {b['reason']}" for b in manifest.bad_shards]
    want = limit if limit is not None else manifest.count
    for info, uri in zip(manifest.shards, manifest.shard_uris()):
        if len(order) >= want:
            break
        _, path = _fs.resolve(uri)
        first, seen = len(order), 0
        try:
            with (
                fs.open_input_stream(path) as raw,
                tarfile.open(fileobj=(stream := _Sha(raw)), mode="r|") as tar,
            ):
                for member in tar:
                    if not member.isfile():
                        continue
                    key, _, suffix = member.name.partition(".")
                    seen += suffix == "latent.npy"
                    try:
                        arr = np.load(io.BytesIO(tar.extractfile(member).read()), allow_pickle=False)
                    except Exception as err:  # corrupt member: skip, count, go on
                        skipped.append(f"{uri}:{member.name}: {type(err).__name__}")
                        continue
                    if suffix == "latent.npy":
                        if key not in latents:
                            order.append(key)
                        latents[key] = arr
                    elif suffix == "logvar.npy":
                        logvars[key] = arr
                    if len(order) > want:
                        break
                else:  # read to the end: the whole shard must be what the manifest recorded
                    _check_shard(stream, info, seen)
        except (OSError, tarfile.TarError, _DamagedShard) as err:
            skipped.append(f"{uri}: {type(err).__name__}: {err}")
            for key in order[first:]:  # a damaged shard is skipped whole, never half-used
                latents.pop(key, None)
                logvars.pop(key, None)
            del order[first:]
    order = order[:want]
    if not order:
        raise ValueError(f"{shards}: no readable latents ({len(skipped)} unreadable entries: {skipped[:3]})")
    z = torch.from_numpy(np.stack([latents[k] for k in order]).astype(np.float32))
    lv = None
    if manifest.has_logvar and all(k in logvars for k in order):
        lv = torch.from_numpy(np.stack([logvars[k] for k in order]).astype(np.float32))
    return EvalInput(
        kind="latents",
        source=str(shards),
        latents=z,
        logvars=lv,
        names=order,
        skipped=skipped,
        vae_spec=manifest.vae,
    )


def read_images(path: str | os.PathLike, limit: int | None = None) -> EvalInput:
    """Images from an IDX file or an image folder/file (sorted; unreadable files skipped and counted)."""
    from revq_ray.vae.images import list_image_files, read_idx_images

    p = Path(path)
    if _is_idx(p):
        arr = read_idx_images(p, limit=limit)
        return EvalInput(
            kind="images", source=str(p), images=list(arr), names=[f"{p.name}[{i}]" for i in range(len(arr))]
        )
    from PIL import Image

    images, names, skipped = [], [], []
    for f in list_image_files(p):
        if limit is not None and len(images) >= limit:
            break
        try:
            with Image.open(f) as im:
                images.append(np.asarray(im.convert("RGB")))
            names.append(str(f.relative_to(p)) if p.is_dir() else f.name)
        except Exception as err:
            skipped.append(f"{f}: {type(err).__name__}")
    if not images:
        raise ValueError(f"{p}: no readable images ({len(skipped)} unreadable)")
    return EvalInput(kind="images", source=str(p), images=images, names=names, skipped=skipped)


def read_audio(path: str | os.PathLike, sample_rate: int, limit: int | None = None) -> EvalInput:
    """Mono waveforms at ``sample_rate`` from an audio folder/file (unreadable files skipped and counted)."""
    from revq_ray.vae.audio import list_audio_files, load_audio

    p = Path(path)
    waves, names, skipped = [], [], []
    for f in list_audio_files(p):
        if limit is not None and len(waves) >= limit:
            break
        try:
            wave, sr = load_audio(f, sample_rate)
        except Exception as err:
            skipped.append(f"{f}: {type(err).__name__}")
            continue
        if wave.numel() == 0:
            skipped.append(f"{f}: empty")
            continue
        waves.append(wave)
        names.append(str(f.relative_to(p)) if p.is_dir() else f.name)
    if not waves:
        raise ValueError(f"{p}: no readable audio ({len(skipped)} unreadable)")
    return EvalInput(
        kind="audio",
        source=str(p),
        waves=waves,
        sample_rates=[sample_rate] * len(waves),
        names=names,
        skipped=skipped,
    )
