"""``revq-ray tokenize`` / ``revq-ray detokenize``: images or audio <-> a token dataset.

    revq-ray tokenize --model runs/quickstart/tokenizer --input photos/ --output tokens/
    revq-ray tokenize --model runs/fashion_mnist_2048 --input train-images-idx3-ubyte.gz --output fm/ \
        --augment flip --limit 10000          # labels from train-labels-idx1-ubyte.gz beside it
    revq-ray detokenize --model runs/quickstart/tokenizer --input tokens/ --output media/

Inputs, class labels (IDX1 files, ImageFolder sub-folders) and captions (``--captions`` .jsonl / .csv) are
described in :mod:`revq_ray.token_sources`. ``tokenize`` writes, under ``--output``::

    manifest.json     {"format": "revq-ray-tokens", "version": 2, "tokenizer": {..., "tokens": T,
                       "codebook_size": K}, "vocab": "per_position" | "flat", "layout": "...", "dtype",
                       "labels": {"kind": "class", "names": [...], "source", "from", "count"} (labelled),
                       "captions": {"kind": "caption", "source", ...} (with --captions),
                       "augment": [] | ["flip"], "codebooks": "codebooks.safetensors",
                       "items": [{"key", "name", "shape", "label"?, "caption"?, "augment"?, "source_key"?,
                                  "file" | "shard", ...}], "skipped": [...], "shards": [...]}
    codebooks.safetensors  "codebooks_tkd" (T, K, d) float32: the vector of code k at token position t
    ids/<key>.npy     (npy format) one array per item: images (T,), audio (W, T) = W windows in time order,
                      T ids each (see revq_ray.audio_tokens)
    tokens-000000.tar (shards format) webdataset shards: <key>.ids.npy + <key>.json per item (the json is the
                      item's manifest entry: name, label, caption, augment, source_key)

**Vocabulary.** Each token position t has its own codebook of K codes. ``--vocab per_position`` (default):
id k at position t means code k of codebook t, ids in [0, K). ``--vocab flat``: one vocabulary of T*K,
id = t*K + k (an autoregressive model can then use one embedding table and one softmax). The code vectors
are exported either way in ``codebooks.safetensors``: ``codebooks_tkd[t, k]`` is exactly the vector the
tokenizer's decode looks up for id k at position t, before the latent layout and the rectifier (in the
quantizer's units: standardized latents, or the VAE's raw units for GQ; ``units`` in the file's metadata).
``embedding.weight = codebooks_tkd.reshape(T * K, d)`` matches the flat ids.

**Labels.** A class-labelled item has ``"label"``: an index into ``manifest["labels"]["names"]``; a captioned
one ``"caption"``; both are in the shards' per-item ``.json`` too, so readers without revq-ray see them.

**Augmentation.** ``--augment flip`` also tokenizes each image mirrored left-right (LlamaGen extracts codes
the same way); the flipped item follows its original, has ``"augment": "flip"``, ``"source_key"`` (its
original's key) and the same label / caption. ``detokenize`` writes it as ``<name>_flip.png``.

Ids are stored as uint16 when every id fits (K, or T*K for flat, at most 65,536), else int32.
``--format auto`` writes ``.npy`` files for up to 1,000 items and webdataset shards above. Inputs are read,
tokenized (images in batches) and written as a stream: above ``--ray-threshold`` inputs (or with ``--ray
always``) through Ray Data, one Tokenizer per actor (``--workers``), otherwise in this process. Unreadable
files are skipped and counted in the manifest.

Reading a token dataset without revq-ray: ``npy`` format: ``json.load`` the manifest, ``np.load(root /
item["file"])`` per item. Shards: any webdataset reader (``tarfile``: ``<key>.ids.npy`` through ``np.load``,
``<key>.json`` through ``json.loads``), or Hugging Face ``datasets.load_dataset("webdataset",
data_files=[...tars])`` (columns ``ids.npy`` and ``json``). :func:`read_tokens` does it here.

``detokenize`` reads such a directory back to media: ``<name>.png`` for images, ``<name>.wav`` for audio at
the tokenizer's rate (``--source-rate`` resamples to each file's original rate and exact length); flat ids are
mapped back to per-position ids first (:func:`per_position_ids`).
"""

from __future__ import annotations

import argparse
import io
import json
import shutil
import sys
import tarfile
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from revq_ray.runtime import MAX_SKIP_FRACTION, skip_failure

FORMAT = "revq-ray-tokens"
VERSION = 2
READABLE_VERSIONS = (1, 2)
MANIFEST = "manifest.json"
CODEBOOKS = "codebooks.safetensors"
VOCABS = ("per_position", "flat")
AUGMENTS = ("flip",)
NPY_MAX_FILES = 1000  # --format auto: .npy files up to this many items, webdataset shards above
IMAGE_BATCH = 64  # images read and encoded together (one VAE batch)
LAYOUT = (
    "images: (T,) ids of one image; audio: (W, T), W windows of window_samples samples in time order, "
    "T ids each in the model's token order; vocab per_position: id k at position t is code k of codebook t "
    "(ids in [0, K)); vocab flat: id = t*K + k"
)


# ------------------------------------------------------------------------------------------- inputs
def list_inputs(path: str | Path, modality: str) -> list[tuple[str, Path]]:
    """(name, file) for every image or audio file under ``path`` (sorted); name is the relative path."""
    from revq_ray.token_sources import build_source

    src = build_source(path, modality, labels="none", log=lambda _m: None)
    return [(it["name"], Path(it["path"])) for it in src.items]


def _id_dtype(vocab_size: int) -> np.dtype:
    """uint16 when every id in [0, vocab_size) fits, else int32."""
    return np.dtype(np.uint16) if vocab_size <= 65536 else np.dtype(np.int32)


def vocab_size(tokens: int, codebook_size: int, vocab: str) -> int:
    """The number of distinct ids: K per position, or T*K for the flat vocabulary."""
    return codebook_size * (tokens if vocab == "flat" else 1)


def to_flat_ids(ids: np.ndarray, codebook_size: int) -> np.ndarray:
    """Per-position ids (..., T) -> flat ids t*K + k (int64)."""
    t = np.arange(ids.shape[-1], dtype=np.int64)
    return ids.astype(np.int64) + t * codebook_size


def per_position_ids(ids: np.ndarray, manifest: dict[str, Any]) -> np.ndarray:
    """Stored ids (..., T) -> per-position ids in [0, K) (int64), whatever the manifest's ``vocab``."""
    ids = np.asarray(ids).astype(np.int64)
    if manifest.get("vocab", "per_position") != "flat":
        return ids
    K = int(manifest["tokenizer"]["codebook_size"])
    t = np.arange(ids.shape[-1], dtype=np.int64)
    k = ids - t * K
    if ids.size and (int(k.min()) < 0 or int(k.max()) >= K):
        bad = np.argwhere((k < 0) | (k >= K))[0]
        raise ValueError(
            f"flat id {int(ids[tuple(bad)])} at position {int(bad[-1])} is outside [t*K, (t+1)*K) with "
            f"K={K}: not a flat id of this tokenizer (check the manifest's vocab)"
        )
    return k


def export_codebooks(model: Any, chunk: int = 4096) -> Any:
    """A ReVQModel's code vectors as (T, K, d) float32: ``[t, k]`` = ``model.quantizer.codes`` of id k at t.

    Gathered through the quantizer's own ``codes`` (what ``decode`` uses before the layout and the rectifier),
    so every method's codebook is exported as decode sees it (SimVQ's mapped codes, GQ's shared prior)."""
    import torch

    q = model.quantizer
    T, K, d = int(model.tokens), int(model.codebook_size), int(q.dim)
    out = torch.empty(T, K, d, dtype=torch.float32)
    with torch.no_grad():
        for k0 in range(0, K, chunk):
            k1 = min(K, k0 + chunk)
            ids = torch.arange(k0, k1, device=model.standardizer.mean.device)[:, None].expand(-1, T)
            out[:, k0:k1] = q.codes(ids).float().transpose(0, 1).cpu()
    return out


def write_codebooks(model: Any, path: Path) -> dict[str, Any]:
    """Write ``codebooks.safetensors`` ("codebooks_tkd"); returns what the file's metadata says."""
    from safetensors.torch import save_file

    cb = export_codebooks(model)
    meta = {
        "units": "raw VAE latent units (GQ)"
        if getattr(model, "_raw_units", False)
        else "standardized latents",
        "quantizer": str(model.cfg.quantizer.type),
        "shape": "T, K, d",
    }
    save_file({"codebooks_tkd": cb.contiguous()}, str(path), metadata=meta)
    return meta


class TokenizeFn:
    """Items -> ids with one Tokenizer (built once: in this process, or once per Ray Data actor).

    An item is {"i" (its position in the input), "name", "path", "index" (IDX position or -1)}; each
    becomes one row {"i", "name", "ids" (npy bytes), "meta" (JSON), "error"}, plus a row for its mirror
    image with ``augment=("flip",)``."""

    def __init__(
        self,
        model: str,
        vae: str | None,
        device: str = "cpu",
        batch_size: int = 32,
        vocab: str = "per_position",
        augment: Sequence[str] = (),
        limit: int | None = None,
    ):
        from revq_ray.tokenizer import Tokenizer

        self.tok = Tokenizer.from_pretrained(model, device=device, vae=vae)
        self.batch_size, self.vocab, self.augment, self.limit = batch_size, vocab, tuple(augment), limit
        self.dtype = _id_dtype(vocab_size(self.tok.tokens, self.tok.codebook_size, vocab))
        self._idx: dict[str, np.ndarray] = {}

    def _npy(self, arr: np.ndarray) -> bytes:
        if self.vocab == "flat":
            arr = to_flat_ids(arr, self.tok.codebook_size)
        buf = io.BytesIO()
        np.save(buf, arr.astype(self.dtype), allow_pickle=False)
        return buf.getvalue()

    @staticmethod
    def _error(it: dict[str, Any], err: Exception) -> dict[str, Any]:
        return {
            "i": int(it["i"]),
            "name": it["name"],
            "ids": b"",
            "meta": "",
            "error": f"{type(err).__name__}: {err}",
        }

    def _image(self, it: dict[str, Any]) -> np.ndarray:
        """One image as uint8 (H, W) gray or (H, W, 3) RGB."""
        if int(it["index"]) >= 0:  # an IDX file, read once per process (the first --limit images)
            from revq_ray.vae.images import read_idx_images

            if it["path"] not in self._idx:
                self._idx[it["path"]] = read_idx_images(it["path"], limit=self.limit)
            return self._idx[it["path"]][int(it["index"])]
        from revq_ray.vae.images import open_image_capped

        with open_image_capped(it["path"]) as im:  # a decompression bomb is refused from its header
            return np.asarray(im.convert("RGB"))

    def rows(self, items: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
        """Tokenize a batch of items (images in one encode call); unreadable ones become error rows."""
        if self.tok.modality == "audio":
            return [self._audio(it) for it in items]
        good, images, out = [], [], []
        for it in items:
            try:
                images.append(self._image(it))
                good.append(it)
            except Exception as err:  # corrupt input: skipped and counted, never fatal
                out.append((int(it["i"]), 0, self._error(it, err)))
        if not good:
            return [r for _, _, r in out]
        flip = "flip" in self.augment
        views = [(img, np.ascontiguousarray(img[:, ::-1]) if flip else None) for img in images]
        try:  # one VAE batch for the whole chunk (originals, then their mirror images)
            flat = self.tok.encode(
                [v for pair in views for v in pair if v is not None], batch_size=IMAGE_BATCH
            )
            per = 2 if flip else 1
            encoded = [[flat[per * j + n].numpy() for n in range(per)] for j in range(len(good))]
        except Exception:  # one odd image fails the batch: encode one at a time to find it
            encoded = [None] * len(good)
        for j, it in enumerate(good):
            try:
                ids = encoded[j] or [self.tok.encode(v)[0].numpy() for v in views[j] if v is not None]
            except Exception as err:
                out.append((int(it["i"]), 0, self._error(it, err)))
                continue
            for n, arr in enumerate(ids):
                meta: dict[str, Any] = {"name": it["name"], "shape": list(arr.shape)}
                if int(it["index"]) >= 0:
                    meta["index"] = int(it["index"])
                if n:
                    meta["augment"] = "flip"
                row = {"i": int(it["i"]), "name": it["name"], "ids": self._npy(arr), "error": ""}
                out.append((int(it["i"]), n, {**row, "meta": json.dumps(meta)}))
        return [r for _, _, r in sorted(out, key=lambda x: x[:2])]

    def _audio(self, it: dict[str, Any]) -> dict[str, Any]:
        try:
            import soundfile as sf

            data, sr = sf.read(it["path"], dtype="float32", always_2d=True)
            ids = self.tok.encode(data.mean(axis=1), sample_rate=int(sr), batch_size=self.batch_size)
            arr = ids.item_windows(0).numpy()
            meta: dict[str, Any] = {"name": it["name"], "length": int(ids.lengths[0])}
            meta.update(source_rate=int(sr), source_length=len(data), windows=int(ids.windows[0]))
            meta["shape"] = list(arr.shape)
            return {
                "i": int(it["i"]),
                "name": it["name"],
                "ids": self._npy(arr),
                "meta": json.dumps(meta),
                "error": "",
            }
        except Exception as err:  # corrupt input: skipped and counted, never fatal
            return self._error(it, err)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        items = [
            {"i": int(i), "name": str(n), "path": str(p), "index": int(x)}
            for i, n, p, x in zip(batch["i"], batch["name"], batch["path"], batch["index"])
        ]
        rows = self.rows(items)
        cols = {k: np.array([r[k] for r in rows], dtype=object) for k in ("name", "ids", "meta", "error")}
        return {**cols, "i": np.array([r["i"] for r in rows], dtype=np.int64)}


def _stream(
    items: list[dict[str, Any]], args: argparse.Namespace, log: Callable[[str], None]
) -> Iterator[dict[str, Any]]:
    """Tokenized rows in input order: through Ray Data for large inputs, else in this process."""
    use_ray = args.ray == "always" or (args.ray == "auto" and len(items) > args.ray_threshold)
    fn_args = (
        args.model,
        args.vae,
        args.device,
        args.batch_size,
        args.vocab,
        tuple(args.augment),
        args.limit,
    )
    if not use_ray:
        fn = TokenizeFn(*fn_args)
        for s in range(0, len(items), IMAGE_BATCH):
            yield from fn.rows(items[s : s + IMAGE_BATCH])
        return
    import ray

    from revq_ray.runtime import init_ray

    init_ray()
    ds = ray.data.from_items(items)
    ds = ds.map_batches(
        TokenizeFn,
        fn_constructor_args=fn_args,
        batch_size=IMAGE_BATCH,
        concurrency=args.workers,
        num_cpus=1,
        batch_format="numpy",
    )
    log(f"[tokenize] streaming {len(items)} items through Ray Data ({args.workers} tokenizer actor(s))")
    ctx = ray.data.DataContext.get_current()
    ctx.execution_options.preserve_order = True  # manifest order = input order
    yield from ds.iter_rows()


class _Writer:
    """Writes ids as .npy files or webdataset shards, and collects the manifest's items."""

    def __init__(self, out: Path, shards: bool, shard_size: int):
        self.out, self.shards, self.shard_size = out, shards, shard_size
        self.items: list[dict[str, Any]] = []
        self.shard_names: list[str] = []
        self._tar: tarfile.TarFile | None = None
        (out / ("" if shards else "ids")).mkdir(parents=True, exist_ok=True)

    def _add(self, name: str, data: bytes) -> None:
        info = tarfile.TarInfo(name)
        info.size, info.mtime = len(data), int(time.time())
        self._tar.addfile(info, io.BytesIO(data))

    def write(self, ids: bytes, meta: dict[str, Any]) -> str:
        """Write one item; returns its key."""
        key = f"{len(self.items):08d}"  # webdataset keys hold no dots; the file's name is in the metadata
        meta = {"key": key, **meta}
        if not self.shards:
            (self.out / "ids" / f"{key}.npy").write_bytes(ids)
            meta["file"] = f"ids/{key}.npy"
        else:
            if len(self.items) % self.shard_size == 0:
                self.close()
                self.shard_names.append(f"tokens-{len(self.shard_names):06d}.tar")
                self._tar = tarfile.open(self.out / self.shard_names[-1], "w")  # noqa: SIM115 (closed in close)
            self._add(f"{key}.ids.npy", ids)
            self._add(f"{key}.json", json.dumps(meta).encode())  # label / caption / augment ride along
            meta["shard"] = self.shard_names[-1]
        self.items.append(meta)
        return key

    def close(self) -> None:
        if self._tar is not None:
            self._tar.close()
            self._tar = None


def _check_args(args: argparse.Namespace) -> None:
    if args.vocab not in VOCABS:
        raise ValueError(f"--vocab {args.vocab!r}: choose one of {VOCABS}")
    bad = [a for a in args.augment if a not in AUGMENTS]
    if bad:
        raise ValueError(f"--augment {bad[0]!r}: choose from {AUGMENTS}")


def tokenize(args: argparse.Namespace, log: Callable[[str], None] = print) -> dict[str, Any]:
    """Run ``revq-ray tokenize`` (see the module docstring); returns the manifest."""
    from revq_ray.data import fs as _fs
    from revq_ray.runtime import is_uri
    from revq_ray.token_sources import build_source
    from revq_ray.tokenizer import Tokenizer

    t0 = time.perf_counter()
    for name, default in (("labels", "auto"), ("class_names", None), ("captions", None), ("limit", None),
                          ("augment", []), ("vocab", "per_position")):  # fmt: skip
        if not hasattr(args, name):  # a Namespace built by hand (older callers)
            setattr(args, name, default)
    args.augment = sorted({a for a in (args.augment or []) if a != "none"})
    _check_args(args)
    remote = str(args.output) if is_uri(args.output) else None
    if remote:  # fail in seconds, before any model is loaded, when the store cannot take the output
        _fs.check_location(remote, write=True)
    probe = Tokenizer.from_pretrained(args.model, vae=args.vae)  # shapes, modality; checks the model early
    if args.augment and probe.modality != "image":
        raise ValueError(
            f"--augment {','.join(args.augment)}: only for image tokenizers (this one is {probe.modality})"
        )
    src = build_source(
        args.input, probe.modality, args.labels, args.class_names, args.captions, args.limit, log
    )
    items = [{"i": i, **it} for i, it in enumerate(src.items)]
    n_out = len(items) * (1 + len(args.augment))
    shards = args.format == "shards" or (args.format == "auto" and n_out > NPY_MAX_FILES)
    # A URI output is written into a local staging folder, then uploaded whole (manifest last).
    out = Path(tempfile.mkdtemp(prefix="revq_tokens_")) if remote else Path(args.output).expanduser()
    out.mkdir(parents=True, exist_ok=True)
    writer, skipped = _Writer(out, shards, args.shard_size), []
    log(f"[tokenize] {len(items)} {probe.modality} items from {args.input} with {probe!r}")
    originals: dict[int, str] = {}
    for row in _stream(items, args, log):
        i = int(row["i"])
        if row["error"]:
            skipped.append(f"{row['name']}: {row['error']}")
            continue
        meta = json.loads(row["meta"])
        if src.labels is not None:
            meta["label"] = int(src.labels[i])
        if src.captions is not None and src.captions[i] is not None:
            meta["caption"] = src.captions[i]
        if meta.get("augment"):
            meta["source_key"] = originals[i]
        key = writer.write(row["ids"], meta)
        if not meta.get("augment"):
            originals[i] = key
        if len(writer.items) % 1000 == 0:
            log(f"[tokenize] {len(writer.items)}/{n_out} items ({time.perf_counter() - t0:.0f}s)")
    writer.close()
    if src.label_info is not None:  # counts of what was written (unreadable inputs are not in it)
        names = src.label_info["names"]
        counts = np.bincount([int(src.labels[i]) for i in originals], minlength=len(names))
        src.label_info["count"] = {n: int(c) for n, c in zip(names, counts)}
    cb_meta = write_codebooks(probe.model, out / CODEBOOKS)
    manifest = {
        "format": FORMAT,
        "version": VERSION,
        "tokenizer": {
            "model": str(args.model) if is_uri(args.model) else str(Path(args.model).expanduser().resolve()),
            "vae": args.vae,  # None: the bundle's own VAE
            "modality": probe.modality,
            "tokens": probe.tokens,
            "codebook_size": probe.codebook_size,
            "sample_rate": probe.sample_rate,
            "window_samples": probe.window_samples,
        },
        "vocab": args.vocab,
        "vocab_size": vocab_size(probe.tokens, probe.codebook_size, args.vocab),
        "layout": LAYOUT,
        "dtype": str(_id_dtype(vocab_size(probe.tokens, probe.codebook_size, args.vocab))),
        "input": str(args.input),
        "limit": args.limit,
        "augment": list(args.augment),
        "codebooks": CODEBOOKS,
        "codebooks_meta": cb_meta,
        "count": len(writer.items),
        "sources": len(originals),  # input items tokenized (count includes their flipped copies)
        "skipped": skipped,
        "shards": writer.shard_names,
    }
    if src.label_info is not None:
        manifest["labels"] = src.label_info
    elif src.caption_info is not None:
        manifest["labels"] = src.caption_info
    if src.caption_info is not None:
        manifest["captions"] = src.caption_info
    manifest["items"] = writer.items
    (out / MANIFEST).write_text(json.dumps(manifest, indent=1))
    if remote:
        _fs.upload_tree(out, remote, skip=(MANIFEST,))
        _fs.upload_tree(out, remote, skip=tuple(p.name for p in out.iterdir() if p.name != MANIFEST))
        shutil.rmtree(out, ignore_errors=True)
    where = f"{len(writer.shard_names)} webdataset shards" if shards else "ids/*.npy"
    log(
        f"[tokenize] {len(writer.items)} items ({len(originals)} inputs"
        f"{' + flips' if args.augment else ''}) -> {where} + {MANIFEST} + {CODEBOOKS} in {remote or out} "
        f"({len(skipped)} unreadable skipped; {time.perf_counter() - t0:.1f}s)"
    )
    return manifest


# ------------------------------------------------------------------------------------------- detokenize
def read_tokens(path: str | Path) -> tuple[dict[str, Any], Iterator[tuple[dict[str, Any], np.ndarray]]]:
    """A ``tokenize`` output directory -> (manifest, iterator of (item metadata, ids array))."""
    from revq_ray.data.fs import local_copy

    root = local_copy(path)  # a URI (tokenize's s3:// output) is downloaded first
    mf = root / MANIFEST
    if not mf.is_file():
        raise FileNotFoundError(f"--input {str(root)!r}: no {MANIFEST} (write one with `revq-ray tokenize`)")
    manifest = json.loads(mf.read_text())
    if manifest.get("format") != FORMAT:
        raise ValueError(f"{mf}: not a revq-ray token directory (format={manifest.get('format')!r})")
    if manifest.get("version", 1) not in READABLE_VERSIONS:
        raise ValueError(
            f"{mf}: token directory version {manifest.get('version')!r}; this revq-ray reads versions "
            f"{READABLE_VERSIONS} (upgrade revq-ray, or re-run `revq-ray tokenize`)"
        )
    manifest.setdefault("vocab", "per_position")  # version 1 had per-position ids only

    def load(data: bytes) -> np.ndarray:
        return np.load(io.BytesIO(data), allow_pickle=False)

    def items() -> Iterator[tuple[dict[str, Any], np.ndarray]]:
        by_key = {it["key"]: it for it in manifest["items"]}
        for it in manifest["items"]:
            if "file" in it:
                yield it, load((root / it["file"]).read_bytes())
        for shard in manifest.get("shards", []):
            with tarfile.open(root / shard, "r") as tar:
                for member in tar:
                    if member.name.endswith(".ids.npy"):
                        key = member.name.split(".", 1)[0]
                        yield by_key[key], load(tar.extractfile(member).read())

    return manifest, items()


def _media_name(name: str, modality: str, augment: str | None = None) -> str:
    stem = str(Path(name).with_suffix("")) + (f"_{augment}" if augment else "")
    return stem + (".wav" if modality == "audio" else ".png")


class DetokenizeFn:
    """(item metadata, per-position ids) -> a media file under ``out`` (one Tokenizer per process or Ray Data
    actor)."""

    def __init__(
        self,
        model: str,
        vae: str | None,
        out: str,
        device: str = "cpu",
        source_rate: bool = False,
        vocoder: str | None = None,
    ):
        from revq_ray.tokenizer import Tokenizer

        self.tok = Tokenizer.from_pretrained(model, device=device, vae=vae)
        self.tok.vocoder_override = vocoder or self.tok.vocoder_override
        self.out, self.source_rate = Path(out), source_rate

    def one(self, meta: dict[str, Any], ids: np.ndarray) -> str:
        from revq_ray.audio_tokens import AudioIds

        tok = self.tok
        dst = self.out / _media_name(meta["name"], tok.modality, meta.get("augment"))
        dst.parent.mkdir(parents=True, exist_ok=True)
        if tok.modality == "audio":
            from revq_ray.vae.audio import save_wav

            aid = AudioIds.from_items(
                [ids.astype(np.int64)], [meta["length"]], tok.tokens, tok.window_samples, tok.sample_rate,
                meta.get("source_rate"), [meta.get("source_length", meta["length"])],
            )  # fmt: skip
            rate = meta.get("source_rate") if self.source_rate else None
            wave = tok.decode_audio(aid, sample_rate=rate)[0]
            save_wav(dst, wave, rate or tok.sample_rate)
        else:
            from PIL import Image

            img = tok.decode(ids.astype(np.int64)[None])[0]
            arr = (img.permute(1, 2, 0).numpy() * 255.0 + 0.5).clip(0, 255).astype(np.uint8)
            Image.fromarray(arr).save(dst)
        return str(dst)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        paths = [self.one(json.loads(m), np.load(io.BytesIO(b))) for m, b in zip(batch["meta"], batch["ids"])]
        return {"path": np.array(paths, dtype=object)}


def detokenize(args: argparse.Namespace, log: Callable[[str], None] = print) -> int:
    """Run ``revq-ray detokenize``; returns the number of files written."""
    t0 = time.perf_counter()
    manifest, items = read_tokens(args.input)
    model = args.model or manifest["tokenizer"]["model"]
    vae = args.vae or manifest["tokenizer"].get("vae")
    out = Path(args.output).expanduser()
    out.mkdir(parents=True, exist_ok=True)
    n = int(manifest["count"])
    use_ray = args.ray == "always" or (args.ray == "auto" and n > args.ray_threshold)
    log(f"[detokenize] {n} items from {args.input} -> {out}" + (" through Ray Data" if use_ray else ""))
    written = 0
    if not use_ray:
        fn = DetokenizeFn(model, vae, str(out), args.device, args.source_rate, args.vocoder)
        for meta, ids in items:
            fn.one(meta, per_position_ids(ids, manifest))
            written += 1
    else:
        import ray

        from revq_ray.runtime import init_ray

        init_ray()

        def rows() -> Iterator[dict[str, Any]]:
            for meta, ids in items:
                buf = io.BytesIO()
                np.save(buf, per_position_ids(ids, manifest), allow_pickle=False)
                yield {"meta": json.dumps(meta), "ids": buf.getvalue()}

        ds = ray.data.from_items(list(rows())).map_batches(
            DetokenizeFn,
            fn_constructor_args=(model, vae, str(out), args.device, args.source_rate, args.vocoder),
            batch_size=16,
            concurrency=args.workers,
            num_cpus=1,
            batch_format="numpy",
        )
        for batch in ds.iter_batches(batch_size=256, batch_format="numpy"):
            written += len(batch["path"])
    log(f"[detokenize] wrote {written} files to {out} ({time.perf_counter() - t0:.1f}s)")
    return written


# ------------------------------------------------------------------------------------------- CLI
def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--vae", default=None, help="VAE spec when --model is not a Tokenizer bundle")
    p.add_argument("--device", default="cpu", help="cpu or cuda (default cpu)")
    p.add_argument(
        "--ray", choices=("auto", "always", "never"), default="auto", help="stream through Ray Data"
    )
    p.add_argument("--ray-threshold", type=int, default=256, help="--ray auto: files above which Ray is used")
    p.add_argument("--workers", type=int, default=2, help="Ray Data tokenizer actors (default 2)")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="revq-ray tokenize",
        description="Images or audio -> token ids (.npy files or webdataset shards) + manifest.json.",
    )
    p.add_argument("--model", required=True, help="Tokenizer bundle (or a run/export dir with --vae)")
    p.add_argument(
        "--input", required=True, help="an image or audio folder, one file, or an IDX3 images file (.gz too)"
    )
    p.add_argument("--output", required=True, help="directory for ids and manifest.json")
    p.add_argument(
        "--format", choices=("auto", "npy", "shards"), default="auto", help="auto: npy <= 1000 files"
    )
    p.add_argument("--shard-size", type=int, default=1000, help="files per webdataset shard")
    p.add_argument("--batch-size", type=int, default=32, help="audio windows per VAE batch")
    p.add_argument(
        "--labels",
        default="auto",
        help="class labels: auto (an IDX1 file beside IDX images; class sub-folders when every file is in "
        "one), folders, none, or an IDX1 labels FILE",
    )
    p.add_argument(
        "--class-names",
        default=None,
        help="class names: a,b,c, a file (one a line) or fashion-mnist (default: folder names; for IDX, "
        "Fashion-MNIST's when the labels path says 'fashion', else 0..N-1)",
    )
    p.add_argument(
        "--captions", default=None, help="captions: a .jsonl ({file, text} a line) or .csv (file,text)"
    )
    p.add_argument("--limit", type=int, default=None, help="tokenize only the first N inputs")
    p.add_argument(
        "--augment",
        action="append",
        choices=("none", *AUGMENTS),
        default=[],
        help="flip: also write the ids of each image mirrored left-right (marked in the manifest)",
    )
    p.add_argument(
        "--vocab",
        choices=VOCABS,
        default="per_position",
        help="per_position: ids in [0, K) per position (default); flat: id = t*K + k in [0, T*K)",
    )
    p.add_argument(
        "--max-skip-fraction",
        type=float,
        default=MAX_SKIP_FRACTION,
        help="exit 1 when more than this fraction of the inputs was skipped (unreadable); 1 = never "
        "(the manifest is written either way and lists each skipped file)",
    )
    _common(p)
    return p


def build_detokenize_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="revq-ray detokenize",
        description="Token ids from `revq-ray tokenize` -> images (.png) / audio (.wav).",
    )
    p.add_argument("--input", required=True, help="a `revq-ray tokenize` output directory")
    p.add_argument("--output", required=True, help="directory for the media files")
    p.add_argument("--model", default=None, help="Tokenizer bundle (default: the one in the manifest)")
    p.add_argument(
        "--source-rate", action="store_true", help="audio: each file at its original rate and exact length"
    )
    p.add_argument(
        "--vocoder", default=None, help="mel VAEs: griffin-lim or vocos:<dir-or-id> (default: bundle's)"
    )
    _common(p)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        manifest = tokenize(args)
    except (FileNotFoundError, ValueError) as err:
        print(f"revq-ray tokenize: error: {err}", file=sys.stderr)
        return 2
    skipped = manifest["skipped"]
    failed = skip_failure(
        len(skipped),
        manifest["sources"] + len(skipped),
        args.max_skip_fraction,
        skipped[0] if skipped else "",
    )
    if failed:
        print(f"revq-ray tokenize: error: {failed}", file=sys.stderr)
        return 1
    return 0


def detokenize_main(argv: Sequence[str] | None = None) -> int:
    args = build_detokenize_parser().parse_args(argv)
    try:
        detokenize(args)
    except (FileNotFoundError, ValueError) as err:
        print(f"revq-ray detokenize: error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
