"""Encode media into latent shards with Ray Data (behind ``python -m revq_ray.encode``).

Pipeline::

    driver: list + sort input items, cut them into shards of ``shard_size`` items (shard j = items
            [j*shard_size, (j+1)*shard_size)), drop shards an earlier run already finished
      -> Ray Data task per shard: read + decode (images resized, gray -> RGB; audio -> fixed crops -> mel)
      -> VAE actor pool (map_batches with a callable class; concurrency=num_actors; 1 GPU each on GPU nodes)
      -> driver: collects each shard's latents, writes shard-XXXXXX.tar atomically + a small
         shard-XXXXXX.json sidecar (plan hash, count, skipped items, per-shard RunningStats)
      -> manifest.json: shard list, skipped inputs with reasons, stats merged from the per-shard stats.

Resume: the assignment of items to shards is a pure function of the sorted input list and ``shard_size``,
and each sidecar records a hash of its shard's plan (item list + encode settings). A re-run keeps every
shard whose tar and matching sidecar exist, and encodes only the rest. Statistics of kept shards come from
their sidecars, so nothing is read twice.

Audio: each clip is cut into non-overlapping crops of the VAE's input length (``audio_samples``; default the
VAE's own), the last crop zero-padded (silence, which the mel front end maps to its floor, -1); a trailing
remainder under a quarter crop is dropped when the clip has a full crop. Each crop is one latent with key
``<item key>_<crop index>``. No padding mask is stored: the quantizer treats every latent alike, and padding
is plain silence. The crop geometry is recorded in ``manifest.extra["audio"]``.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from revq_ray.core.stats import RunningStats
from revq_ray.data import fs as _fs
from revq_ray.data.shards import DTYPES, MANIFEST_NAME, Manifest, ShardInfo, shard_name, write_shard
from revq_ray.data.sources import (
    SourceItem,
    audio_crops,
    decode_audio,
    decode_image,
    item_key,
    list_sources,
    read_idx_range,
    read_item_bytes,
)
from revq_ray.runtime import get_logger, init_ray
from revq_ray.vae.images import RESIZE_MODES

MIN_CROP_FRACTION = 0.25
SHORT_CLIP_FRACTION = 0.5  # a clip shorter than this fraction of one crop is mostly padding: flagged
_DECODE_CHUNK = 64  # decoded items per output block of a read task (keeps blocks small for big images)
READER_CPUS = 1  # CPUs each read (decode) task reserves; the actors must leave at least this much


_log = get_logger("revq_ray.encode").info


# --------------------------------------------------------------------------------------------- settings
def encode_settings(vae: Any) -> dict[str, Any]:
    """What a read task needs to turn raw media into VAE inputs (JSON-able; no model weights)."""
    kind = getattr(vae, "input_kind", "image" if vae.modality == "image" else "mel")
    s: dict[str, Any] = {
        "modality": vae.modality,
        "input_kind": kind,
        "input_shape": list(vae.input_shape),
        "latent_shape": list(vae.latent_shape),
    }
    if kind == "mel":
        fe = vae.front_end
        frames = int(vae.input_shape[-1])
        s.update(
            sample_rate=int(fe.sample_rate),
            front_end=fe.config(),
            # 1 + n // hop frames for n samples (centered STFT): (frames - 1) * hop gives exactly `frames`.
            crop_samples=(frames - 1) * int(fe.hop),
            hop=int(fe.hop),
        )
    elif kind == "waveform":
        s.update(sample_rate=int(vae.sample_rate), crop_samples=int(vae.input_shape[-1]))
    if "crop_samples" in s:
        s["min_crop_fraction"] = MIN_CROP_FRACTION
        s["crop_seconds"] = s["crop_samples"] / s["sample_rate"]
    return s


class AudioPrep:
    """Waveform (T,) at the VAE's rate -> VAE inputs (n_crops, *input_shape), the way the pipeline does it."""

    def __init__(self, settings: dict[str, Any]):
        self.s = settings
        self.front_end = None
        if settings["input_kind"] == "mel":
            from revq_ray.vae.audio import MelFrontEnd

            self.front_end = MelFrontEnd(**settings["front_end"])

    def __call__(self, wave) -> np.ndarray:
        import torch

        s = self.s
        crops = audio_crops(wave, s["crop_samples"], s["min_crop_fraction"])
        if not crops:
            raise ValueError("empty audio clip")
        x = torch.stack(crops)  # (n, crop_samples)
        shape = tuple(s["input_shape"])
        if self.front_end is not None:
            with torch.no_grad():
                mel = self.front_end(x)  # (n, n_mels, frames)
            frames = shape[-1]
            if mel.shape[-1] < frames:
                mel = torch.nn.functional.pad(mel, (0, frames - mel.shape[-1]), value=-1.0)
            x = mel[..., :frames]
        else:  # waveform VAEs: mono replicated to the VAE's channel count
            x = x[:, None, :].expand(-1, shape[0], -1)
        return x.float().contiguous().numpy()


def _load_vae(spec: str, device: str, image_size: int | None, audio_samples: int | None):
    from revq_ray.vae import load_vae

    kwargs: dict[str, Any] = {}
    if image_size is not None:
        kwargs["image_size"] = image_size
    if audio_samples is not None:
        kwargs["audio_samples"] = audio_samples
    return load_vae(spec, device, **kwargs)


# --------------------------------------------------------------------------------------------- read task
def _short_clip_note(samples: int, settings: dict[str, Any]) -> str:
    """A note for a clip so short that its one crop is mostly padding ("" otherwise)."""
    crop = int(settings["crop_samples"])
    if samples >= SHORT_CLIP_FRACTION * crop:
        return ""
    sr = settings["sample_rate"]
    return (
        f"short clip: {1000 * samples / sr:.0f} ms in a {1000 * crop / sr:.0f} ms crop "
        f"({100 * (1 - samples / crop):.0f}% padding)"
    )


def _idx_image(fs: Any, it: SourceItem, items: list[SourceItem], cache: dict[str, tuple[int, np.ndarray]]):
    """One IDX image; the file's needed range is read once per task (a truncated file: what is present)."""
    member = int(it.member)  # type: ignore[arg-type]
    if it.uri not in cache:
        idx_members = [int(x.member) for x in items if x.uri == it.uri]  # type: ignore[arg-type]
        lo, hi = min(idx_members), max(idx_members) + 1
        cache[it.uri] = (lo, read_idx_range(fs, it.uri, lo, hi))
    lo, arr = cache[it.uri]
    if member - lo >= len(arr):
        raise ValueError(f"truncated IDX file: image {member} is past the {lo + len(arr)} images present")
    return arr[member - lo]


def _decode_items(
    fs: Any, items: list[SourceItem], settings: dict[str, Any]
) -> Iterator[tuple[list, str, str]]:
    """Yield (inputs list, error, note) per item, in order; inputs are (*input_shape) float32 arrays; a note
    flags a usable but suspicious item (an audio clip that is mostly padding)."""
    shape = tuple(settings["input_shape"])
    raw = read_item_bytes(fs, items)
    prep = AudioPrep(settings) if settings["modality"] == "audio" else None
    idx_cache: dict[str, tuple[int, np.ndarray]] = {}
    for it, data in zip(items, raw):
        try:
            note = ""
            if isinstance(data, Exception):
                raise data
            if it.kind == "idx":
                from revq_ray.vae.images import to_vae_input

                xs = [
                    to_vae_input(
                        _idx_image(fs, it, items, idx_cache), shape[-1], settings.get("resize", "stretch")
                    ).numpy()
                ]
            elif prep is None:
                xs = [decode_image(data, shape[-1], settings.get("resize", "stretch")).numpy()]
            else:
                wave = decode_audio(data, settings["sample_rate"])
                note = _short_clip_note(int(wave.shape[0]), settings)
                xs = list(prep(wave))
            yield xs, "", note
        except Exception as err:  # noqa: BLE001 - a bad item is skipped and listed, never fatal
            yield [np.zeros(shape, np.float32)], f"{type(err).__name__}: {err}"[:300], ""


def _read_task(batch: dict[str, np.ndarray], fs: Any, settings: dict[str, Any]) -> Iterator[dict[str, Any]]:
    """Ray Data task: one row per shard in, decoded VAE inputs out (several small blocks)."""
    shape = tuple(settings["input_shape"])
    for shard, plan_json in zip(batch["shard"], batch["plan"]):
        plan = json.loads(plan_json)
        items = [SourceItem.from_list(x) for x in plan["items"]]
        cols = ("shard", "item", "nrows", "key", "x", "error", "note", "source")
        rows: dict[str, list] = {k: [] for k in cols}
        for i, (xs, error, note) in enumerate(_decode_items(fs, items, settings)):
            for j, x in enumerate(xs):
                rows["shard"].append(int(shard))
                rows["item"].append(i)
                rows["nrows"].append(len(xs))
                key = plan["keys"][i]
                rows["key"].append(key if settings["modality"] != "audio" else f"{key}_{j:03d}")
                rows["x"].append(x)
                rows["error"].append(error)
                rows["note"].append(note)
                rows["source"].append(items[i].display)
            if len(rows["x"]) >= _DECODE_CHUNK:
                yield _pack(rows, shape)
                rows = {k: [] for k in rows}
        if rows["x"]:
            yield _pack(rows, shape)


def _pack(rows: dict[str, list], shape: tuple[int, ...]) -> dict[str, np.ndarray]:
    out = {
        k: np.asarray(v, dtype=object) for k, v in rows.items() if k not in ("x", "shard", "item", "nrows")
    }
    out["x"] = np.stack(rows["x"]).astype(np.float32).reshape(-1, *shape)
    for k in ("shard", "item", "nrows"):
        out[k] = np.asarray(rows[k], dtype=np.int64)
    return out


# --------------------------------------------------------------------------------------------- VAE actor
class _VAEEncoder:
    """Ray Data actor: holds the frozen VAE on its device and encodes batches of decoded inputs."""

    def __init__(self, spec, device, image_size, audio_samples, want_logvar, micro_batch, threads):
        import torch

        if device == "cpu" and threads:
            torch.set_num_threads(int(threads))
        self.vae = _load_vae(spec, device, image_size, audio_samples)
        self.device, self.want_logvar, self.micro_batch = device, want_logvar, micro_batch
        self.latent_shape = tuple(self.vae.latent_shape)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        import torch

        x = batch.pop("x")
        error = np.asarray(batch["error"], dtype=object)
        ok = np.flatnonzero(error == "")
        b = len(error)
        latent = np.zeros((b, *self.latent_shape), np.float32)
        logvar = np.zeros((b, *self.latent_shape), np.float32) if self.want_logvar else None
        with torch.inference_mode():
            for s in range(0, len(ok), self.micro_batch):
                idx = ok[s : s + self.micro_batch]
                xb = torch.from_numpy(x[idx]).to(self.device)
                if self.want_logvar:
                    post = self.vae.posterior(xb)
                    latent[idx] = post.mean.float().cpu().numpy()
                    logvar[idx] = post.logvar.float().cpu().numpy()  # type: ignore[index]
                else:
                    latent[idx] = self.vae.encode(xb).float().cpu().numpy()
        finite = np.isfinite(latent.reshape(b, -1)).all(1)
        if logvar is not None:
            finite &= np.isfinite(logvar.reshape(b, -1)).all(1)
        error[(error == "") & ~finite] = "VAE produced NaN/Inf latents for this input"
        batch["error"] = error
        batch["latent"] = latent
        if logvar is not None:
            batch["logvar"] = logvar
        return batch


# --------------------------------------------------------------------------------------------- driver
@dataclass
class _ShardAcc:
    """Collects one shard's rows on the driver until every one of its items has arrived."""

    index: int
    num_items: int
    plan_hash: str
    rows_seen: dict[int, int] = field(default_factory=dict)
    done: int = 0
    keys: list[str] = field(default_factory=list)
    latents: list[np.ndarray] = field(default_factory=list)
    logvars: list[np.ndarray] = field(default_factory=list)
    skipped: dict[int, dict[str, str]] = field(default_factory=dict)
    flagged: dict[int, dict[str, str]] = field(default_factory=dict)

    def add(self, item: int, nrows: int, key: str, z, lv, error: str, note: str, source: str) -> None:
        if error:
            self.skipped[item] = {"path": source, "reason": error}
        else:
            self.keys.append(key)
            self.latents.append(z)
            if lv is not None:
                self.logvars.append(lv)
            if note:
                self.flagged[item] = {"path": source, "note": note}
        seen = self.rows_seen.get(item, 0) + 1
        self.rows_seen[item] = seen
        if seen == nrows:
            self.done += 1

    @property
    def complete(self) -> bool:
        return self.done == self.num_items


def _plan_hash(items: list[SourceItem], keys: list[str], fingerprint: dict[str, Any]) -> str:
    blob = json.dumps({"items": [i.to_list() for i in items], "keys": keys, "settings": fingerprint})
    return hashlib.sha256(blob.encode()).hexdigest()[:32]


def _sidecar_name(index: int) -> str:
    return shard_name(index)[: -len(".tar")] + ".json"


def _read_sidecar(fs: Any, root: str, index: int) -> dict[str, Any] | None:
    try:
        return json.loads(_fs.read_bytes(fs, _fs.join(root, _sidecar_name(index))))
    except Exception:  # noqa: BLE001 - missing or corrupt: the shard is simply not finished
        return None


@dataclass
class EncodeResult:
    """What :func:`encode_to_shards` did."""

    manifest: Manifest
    items: int  # input items listed (after --limit)
    shards_written: int
    shards_kept: int  # finished by an earlier run
    seconds: float

    @property
    def items_per_s(self) -> float:
        return self.items_encoded / max(self.seconds, 1e-9)

    items_encoded: int = 0  # input items processed in this run (kept shards excluded)
    short_clips: int = 0  # audio clips that are mostly padding (listed in manifest.extra["audio"])

    @property
    def skip_fraction(self) -> float:
        """Skipped inputs over listed inputs (1.0 when nothing was listed)."""
        return self.manifest.num_skipped / self.items if self.items else 1.0

    def summary(self) -> str:
        m = self.manifest
        short = f", {self.short_clips} audio clips mostly padding" if self.short_clips else ""
        return (
            f"{m.count} latents from {self.items} inputs ({m.num_skipped} skipped{short}) in {len(m.shards)} "
            f"shards [{self.shards_written} written, {self.shards_kept} kept from an earlier run] in "
            f"{self.seconds:.1f}s: {self.items_per_s:.1f} items/s -> {m.root}"
        )


def check_result(result: EncodeResult, max_skip_fraction: float) -> str:
    """Why an encode should count as failed ("" if it should not): nothing encoded, or too many skipped
    (:func:`revq_ray.runtime.skip_failure`, the rule ``tokenize`` follows too)."""
    from revq_ray.runtime import skip_failure

    m = result.manifest
    first = f"{m.skipped[0]['path']}: {m.skipped[0]['reason']}" if m.skipped else ""
    if m.count == 0:
        return f"nothing was encoded: {m.num_skipped} of {result.items} inputs were skipped" + (
            f" (e.g. {first})" if first else ""
        )
    return skip_failure(m.num_skipped, result.items, max_skip_fraction, first)


@dataclass
class _Probe:
    """What the driver learns from loading the VAE once on CPU: shapes, input settings, audio crop length."""

    settings: dict[str, Any]
    latent_shape: list[int]
    want_logvar: bool
    image_size: int | None
    audio_samples: int | None

    def fingerprint(self, vae_spec: str, dtype: str) -> dict[str, Any]:
        """Everything besides the items that decides a shard's bytes (part of each shard's plan hash)."""
        return {
            "vae": vae_spec,
            "dtype": dtype,
            "logvar": self.want_logvar,
            "image_size": self.image_size,
            "settings": self.settings,
        }


def _probe_vae(
    vae_spec: str, image_size: int | None, audio_seconds: float | None, logvar: bool | None, resize: str
):
    if resize not in RESIZE_MODES:
        raise ValueError(f"resize={resize!r}: choose one of {RESIZE_MODES}")
    probe = _load_vae(vae_spec, "cpu", image_size, None)
    audio_samples = None
    if probe.modality == "audio" and audio_seconds is not None:
        audio_samples = int(round(audio_seconds * probe.sample_rate))
        probe = _load_vae(vae_spec, "cpu", image_size, audio_samples)
    if probe.modality == "image" and image_size is None:
        image_size = int(probe.input_shape[-1])
    want_logvar = bool(probe.is_gaussian) if logvar is None else logvar
    if want_logvar and not probe.is_gaussian:
        raise ValueError(f"--logvar: {vae_spec} is not a Gaussian VAE (no posterior); use --no-logvar")
    settings = encode_settings(probe)
    if settings["modality"] == "image" and resize != "stretch":  # in the fingerprint: resume sees it
        settings["resize"] = resize
    return _Probe(settings, list(probe.latent_shape), want_logvar, image_size, audio_samples)


@dataclass
class _Plan:
    """Which shards to encode and which an earlier run of the same plan finished."""

    todo: list[dict[str, Any]]
    done: dict[int, dict[str, Any]]
    plan_id: str  # hash of every shard's plan: the identity of this encode
    num_shards: int
    foreign: list[str]  # shard sidecars written by another plan (other inputs or settings)


def _plan_shards(items, keys, shard_size: int, fingerprint: dict[str, Any], fs: Any, root: str) -> _Plan:
    num_shards = math.ceil(len(items) / shard_size)
    todo: list[dict[str, Any]] = []
    done: dict[int, dict[str, Any]] = {}
    foreign: list[str] = []
    hashes = []
    for j in range(num_shards):
        chunk = items[j * shard_size : (j + 1) * shard_size]
        ckeys = keys[j * shard_size : (j + 1) * shard_size]
        h = _plan_hash(chunk, ckeys, fingerprint)
        hashes.append(h)
        side = _read_sidecar(fs, root, j)
        if side is not None and side.get("plan") != h:
            foreign.append(_sidecar_name(j))
        if (
            side is not None
            and side.get("plan") == h
            and (side["count"] == 0 or _fs.is_file(fs, _fs.join(root, shard_name(j))))
        ):
            done[j] = side
            continue
        todo.append(
            {"shard": j, "plan": json.dumps({"items": [i.to_list() for i in chunk], "keys": ckeys}), "h": h}
        )
    plan_id = hashlib.sha256(json.dumps(hashes).encode()).hexdigest()[:32]
    return _Plan(todo, done, plan_id, num_shards, foreign)


_SHARD_FILE = re.compile(r"^shard-(\d{6})\.(tar|json)$")


def _prepare_output(fs: Any, root: str, plan: _Plan, overwrite: bool) -> None:
    """Refuse to mix this encode with another one's shards (unless ``overwrite``: then remove them), and
    invalidate the manifest before any shard is rewritten, so no reader sees a manifest over mixed shards."""
    import pyarrow.fs as pafs

    names = {i.base_name for i in fs.get_file_info(pafs.FileSelector(root, allow_not_found=True))}
    mpath = _fs.join(root, MANIFEST_NAME)
    other: list[str] = list(plan.foreign)
    if MANIFEST_NAME in names:
        try:
            old = json.loads(_fs.read_bytes(fs, mpath))
        except Exception:  # noqa: BLE001 - unreadable: it is replaced below
            old = {}
        if (old.get("extra") or {}).get("plan") != plan.plan_id:
            other.insert(0, f"{MANIFEST_NAME} of {old.get('source') or 'another encode'}")
    extra = sorted(n for n in names if (m := _SHARD_FILE.match(n)) and int(m.group(1)) >= plan.num_shards)
    other += extra
    if other and not overwrite:
        raise ValueError(
            f"{root} holds shards of another encode (other inputs or settings): {', '.join(other[:4])}"
            f"{' ...' if len(other) > 4 else ''}. Pass --overwrite (overwrite=True) to replace them, or "
            "choose another --output"
        )
    if (plan.todo or other) and MANIFEST_NAME in names:
        fs.delete_file(mpath)  # first: from here until the new manifest, the directory reads as unfinished
    for name in other:
        if _SHARD_FILE.match(name):
            fs.delete_file(_fs.join(root, name))
            tar = name[: -len(".json")] + ".tar" if name.endswith(".json") else ""
            if tar and tar in names and tar not in other:
                fs.delete_file(_fs.join(root, tar))


def _build_manifest(plan: _Plan, probe: _Probe, list_skipped, meta: dict[str, Any]) -> tuple[Manifest, int]:
    """The manifest from the sidecars (stats merged per shard, no pass over the latents); also returns
    how many audio clips were flagged as mostly padding."""
    stats = RunningStats(probe.latent_shape)
    shards: list[ShardInfo] = []
    skipped = list(list_skipped)
    flagged: list[dict[str, str]] = []
    for j in range(plan.num_shards):
        side = plan.done.get(j)
        if side is None:
            raise RuntimeError(f"shard {j} was not finished; re-run to resume")
        if side["count"]:
            shards.append(
                ShardInfo(shard_name(j), side["count"], side.get("size", 0), side.get("sha256", ""))
            )
            stats.merge(RunningStats.from_state_dict(side["stats"]))
        skipped.extend(side["skipped"])
        flagged.extend(side.get("flagged", []))
    settings = probe.settings
    extra: dict[str, Any] = {"shard_size_items": meta["shard_size"], "inputs": meta["inputs"]}
    extra["plan"] = plan.plan_id
    if probe.image_size is not None and settings["modality"] == "image":
        extra["image_size"] = probe.image_size
    if settings["modality"] == "audio":
        extra["audio"] = {
            k: settings[k] for k in settings if k not in ("input_shape", "latent_shape", "modality")
        }
        extra["audio"]["short_clips"] = flagged
    manifest = Manifest(
        count=sum(s.count for s in shards),
        latent_shape=probe.latent_shape,
        dtype=meta["dtype"],
        has_logvar=probe.want_logvar,
        vae=meta["vae"],
        shards=shards,
        skipped=skipped,
        stats=stats.state_dict() if stats.count else None,
        modality=settings["modality"],
        source=meta["source"],
        input_shape=list(settings["input_shape"]),
        extra=extra,
        root=meta["root"],
    )
    return manifest, len(flagged)


def encode_to_shards(
    input_path: str,
    vae_spec: str,
    output: str,
    *,
    limit: int | None = None,
    image_size: int | None = None,
    resize: str = "stretch",
    audio_seconds: float | None = None,
    shard_size: int = 1024,
    batch_size: int = 64,
    num_actors: int = 1,
    logvar: bool | None = None,
    dtype: str = "float32",
    device: str = "auto",
    cpus_per_actor: float = 1.0,
    progress: bool = True,
    filesystem: Any = None,
    overwrite: bool = False,
) -> EncodeResult:
    """Encode every input item under ``input_path`` with the VAE ``vae_spec`` into shards under ``output``.

    Args:
        input_path: image/audio folder, IDX file, tar(s) of raw media; local or URI (see
            :mod:`revq_ray.data.sources`).
        vae_spec: ``diffusers:...``, ``taesd:...`` or ``builtin:...`` (see :func:`revq_ray.vae.load_vae`).
        output: shard directory (local or URI); re-running with the same arguments resumes.
        limit: encode only the first ``limit`` items (sorted order).
        image_size: image VAEs: square input size (inputs are resized to it); default the VAE's.
        resize: image VAEs: ``stretch`` non-square images to the square, or ``center_crop`` them (the
            shorter side to ``image_size``, then the central square, as ImageNet tokenizers are fed).
        audio_seconds: audio VAEs: crop length in seconds; default the VAE's own input length.
        shard_size: input items per shard (images: latents per shard, minus skipped ones; audio: each
            clip gives one latent per crop).
        batch_size: VAE batch size inside each actor.
        num_actors: VAE actors (each holds one copy of the VAE; one GPU each on GPU clusters).
        logvar: store posterior log-variances; default: when the VAE is Gaussian.
        dtype: ``float32`` or ``float16`` storage.
        device: ``auto`` (GPU actors when the cluster has GPUs), ``cpu`` or ``cuda``.
        cpus_per_actor: CPUs reserved per CPU actor (also its torch thread count).
        overwrite: replace shards another encode (other inputs or settings) left in ``output``; without
            it such a directory is refused before anything is written.
    """
    t0 = time.time()
    device = _check_args_and_start(shard_size, batch_size, num_actors, dtype, device, cpus_per_actor)
    probe = _probe_vae(vae_spec, image_size, audio_seconds, logvar, resize)
    in_fs, in_root, items, list_skipped = list_sources(input_path, probe.settings["modality"], limit=limit)
    keys = [item_key(i, it, in_root) for i, it in enumerate(items)]
    out_fs, out_root = _fs.resolve(output, filesystem)
    _fs.makedirs(out_fs, out_root)
    _remove_stray_tmp(out_fs, out_root)
    plan = _plan_shards(items, keys, shard_size, probe.fingerprint(vae_spec, dtype), out_fs, out_root)
    _prepare_output(out_fs, out_root, plan, overwrite)
    if progress:
        _log(
            f"{len(items)} inputs ({len(list_skipped)} unreadable containers) -> {plan.num_shards} shards of "
            f"{shard_size}; {len(plan.done)} already finished, {len(plan.todo)} to encode with {num_actors} "
            f"{device} actor(s); latent {probe.latent_shape}"
        )
    written = 0
    if plan.todo:
        written = _run_pipeline(
            plan.todo, in_fs=in_fs, settings=probe.settings, out_fs=out_fs, out_root=out_root,
            spec=vae_spec, device=device, image_size=probe.image_size, audio_samples=probe.audio_samples,
            want_logvar=probe.want_logvar, batch_size=batch_size, num_actors=num_actors,
            cpus_per_actor=cpus_per_actor, dtype=dtype, progress=progress, t0=t0, done=plan.done,
            num_shards=plan.num_shards,
        )  # fmt: skip
    meta = {"shard_size": shard_size, "inputs": len(items), "dtype": dtype, "vae": vae_spec}
    meta.update(source=str(input_path), root=str(output))
    manifest, short = _build_manifest(plan, probe, list_skipped, meta)
    manifest.save(output, filesystem=filesystem)
    n_encoded = sum(min(shard_size, len(items) - t["shard"] * shard_size) for t in plan.todo)
    result = EncodeResult(manifest, len(items), written, plan.num_shards - written, time.time() - t0)
    result.items_encoded, result.short_clips = n_encoded, short
    if progress:
        _log(result.summary() + (" (see manifest extra.audio.short_clips)" if short else ""))
    return result


def _check_args_and_start(
    shard_size: int, batch_size: int, num_actors: int, dtype: str, device: str, cpus_per_actor: float = 1.0
) -> str:
    """Validate the arguments, start Ray if needed, resolve ``device="auto"``, and check that the CPU actors
    leave a CPU for the readers (else Ray Data waits forever, silently: seen with 2 actors on 2 cores)."""
    import ray

    if shard_size < 1 or batch_size < 1 or num_actors < 1:
        raise ValueError(
            f"shard_size={shard_size}, batch_size={batch_size}, num_actors={num_actors}: all >= 1"
        )
    if dtype not in DTYPES:
        raise ValueError(f"dtype={dtype!r}: choose one of {DTYPES}")
    if device not in ("auto", "cpu", "cuda"):
        raise ValueError(f"device={device!r}: choose auto, cpu or cuda")
    # Ray's own default size (one logical CPU per core), plus room for one reader beside the actors.
    init_ray(num_cpus=max(os.cpu_count() or 1, math.ceil(num_actors * cpus_per_actor) + READER_CPUS))
    if device == "auto":
        device = "cuda" if ray.cluster_resources().get("GPU", 0) >= 1 else "cpu"
    total = ray.cluster_resources().get("CPU", 0)
    needed = READER_CPUS + (0 if device == "cuda" else num_actors * cpus_per_actor)
    if total < needed:
        raise ValueError(
            f"num_actors={num_actors} x cpus_per_actor={cpus_per_actor} leave no CPU for the readers on this "
            f"Ray ({total:g} CPUs; the actors and one reader need {needed:g}): lower --num-actors / "
            "--cpus-per-actor, or start Ray with more logical CPUs (--num-cpus)"
        )
    return device


def _remove_stray_tmp(fs: Any, root: str) -> None:
    """Delete ``*.tmp-*`` leftovers of a crashed run (never listed anywhere, so never read)."""
    import pyarrow.fs as pafs

    for info in fs.get_file_info(pafs.FileSelector(root, recursive=False)):
        if info.type == pafs.FileType.File and ".tmp-" in info.base_name:
            fs.delete_file(info.path)


def _run_pipeline(
    todo, *, in_fs, settings, out_fs, out_root, spec, device, image_size, audio_samples, want_logvar,
    batch_size, num_actors, cpus_per_actor, dtype, progress, t0, done, num_shards,
) -> int:  # fmt: skip
    import ray.data

    hashes = {t["shard"]: t["h"] for t in todo}
    sizes = {t["shard"]: len(json.loads(t["plan"])["items"]) for t in todo}
    rows = [{"shard": t["shard"], "plan": t["plan"]} for t in todo]
    ds = ray.data.from_items(rows, override_num_blocks=len(rows))
    ds = ds.map_batches(
        _read_task,
        batch_size=1,
        batch_format="numpy",
        fn_kwargs={"fs": in_fs, "settings": settings},
        num_cpus=READER_CPUS,
        # Decode tasks run many at once: one thread each. Remote args the actors do not share also keep Ray
        # Data from fusing the read into the VAE actors, so decoding stays in its own parallel tasks,
        # pipelined with encoding, instead of running serially inside each actor.
        runtime_env={"env_vars": {"OMP_NUM_THREADS": "1"}},
    )
    gpu = device == "cuda"
    ds = ds.map_batches(
        _VAEEncoder,
        fn_constructor_kwargs={
            "spec": spec,
            "device": device,
            "image_size": image_size if settings["modality"] == "image" else None,
            "audio_samples": audio_samples,
            "want_logvar": want_logvar,
            "micro_batch": batch_size,
            "threads": 0 if gpu else max(1, int(cpus_per_actor)),
        },
        batch_size=batch_size,
        batch_format="numpy",
        compute=ray.data.ActorPoolStrategy(size=num_actors),
        num_gpus=1 if gpu else 0,
        num_cpus=1 if gpu else cpus_per_actor,
    )
    pending: dict[int, _ShardAcc] = {}
    written = 0
    items_done = 0
    for batch in ds.iter_batches(batch_size=None, batch_format="numpy"):
        lv_col = batch.get("logvar")
        for r in range(len(batch["shard"])):
            j = int(batch["shard"][r])
            acc = pending.get(j)
            if acc is None:
                acc = pending[j] = _ShardAcc(j, sizes[j], hashes[j])
            acc.add(
                int(batch["item"][r]),
                int(batch["nrows"][r]),
                str(batch["key"][r]),
                batch["latent"][r],
                None if lv_col is None else lv_col[r],
                str(batch["error"][r]),
                str(batch["note"][r]),
                str(batch["source"][r]),
            )
            if acc.complete:
                done[j] = _finish_shard(acc, out_fs, out_root, dtype)
                del pending[j]
                written += 1
                items_done += acc.num_items
                if progress:
                    rate = items_done / max(time.time() - t0, 1e-9)
                    _log(
                        f"{shard_name(j)}: {done[j]['count']} latents, {len(acc.skipped)} skipped "
                        f"({len(done)}/{num_shards} shards, {rate:.1f} items/s)"
                    )
    if pending:
        raise RuntimeError(f"shards {sorted(pending)} did not receive all their items; re-run to resume")
    return written


def _finish_shard(acc: _ShardAcc, fs: Any, root: str, dtype: str) -> dict[str, Any]:
    """Write the shard tar (atomic), then its sidecar: the sidecar is the commit marker resume trusts."""
    import torch

    count = len(acc.keys)
    stats = RunningStats(acc.latents[0].shape if count else (1,))
    info = None
    if count:
        z = np.stack(acc.latents)
        lv = np.stack(acc.logvars) if acc.logvars else None
        info = write_shard(root, acc.index, acc.keys, z, lv, dtype=dtype, filesystem=fs)
        stats.update(torch.from_numpy(z.astype(dtype).astype(np.float32)))
    side = {
        "plan": acc.plan_hash,
        "count": count,
        "size": info.size if info else 0,
        "sha256": info.sha256 if info else "",
        "skipped": [acc.skipped[i] for i in sorted(acc.skipped)],
        "flagged": [acc.flagged[i] for i in sorted(acc.flagged)],
        "stats": stats.state_dict() if count else None,
    }
    _fs.write_bytes_atomic(fs, _fs.join(root, _sidecar_name(acc.index)), json.dumps(side).encode())
    return side


__all__ = ["AudioPrep", "EncodeResult", "check_result", "encode_settings", "encode_to_shards"]
