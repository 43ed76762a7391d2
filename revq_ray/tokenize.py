"""``revq-ray tokenize`` / ``revq-ray detokenize``: a folder of images or audio <-> a token dataset.

    revq-ray tokenize --model runs/quickstart/tokenizer --input photos/ --output tokens/
    revq-ray detokenize --model runs/quickstart/tokenizer --input tokens/ --output media/

``tokenize`` writes, under ``--output``::

    manifest.json     {"format": "revq-ray-tokens", "version": 1, "tokenizer": {...}, "layout": "...",
                       "items": [{"key", "name", "shape", "length", "source_rate", "windows", "file"}],
                       "skipped": [...], "shards": [...]}
    ids/<key>.npy     (npy format) one array per input file: images (T,), audio (W, T) = W windows in time
                      order, T ids each (see revq_ray.audio_tokens)
    tokens-000000.tar (shards format) webdataset shards: <key>.ids.npy + <key>.json per input file

Ids are stored as uint16 when the codebook has at most 65,536 codes, else int32. ``--format auto`` writes
``.npy`` files for up to 1,000 inputs and webdataset shards above. Inputs are read, tokenized and written as
a stream: above ``--ray-threshold`` files (or with ``--ray always``) through Ray Data, one Tokenizer per actor
(``--workers``), otherwise in this process. Unreadable files are skipped and counted in the manifest.

``detokenize`` reads such a directory back to media: ``<name>.png`` for images, ``<name>.wav`` for audio at
the tokenizer's rate (``--source-rate`` resamples to each file's original rate and exact length).
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
VERSION = 1
MANIFEST = "manifest.json"
NPY_MAX_FILES = 1000  # --format auto: .npy files up to this many inputs, webdataset shards above
LAYOUT = (
    "images: (T,) ids of one image; audio: (W, T), W windows of window_samples samples in time order, "
    "T ids each in the model's token order"
)


# ------------------------------------------------------------------------------------------- inputs
def list_inputs(path: str | Path, modality: str) -> list[tuple[str, Path]]:
    """(name, file) for every image or audio file under ``path`` (sorted); name is the relative path."""
    from revq_ray.vae.audio import list_audio_files
    from revq_ray.vae.images import list_image_files

    p = Path(path).expanduser()
    if not p.exists():
        raise FileNotFoundError(f"--input {str(p)!r} does not exist")
    files = list_audio_files(p) if modality == "audio" else list_image_files(p)
    if not files:
        kind = "audio (.wav/.flac/...)" if modality == "audio" else "image (.png/.jpg/...)"
        raise FileNotFoundError(f"--input {str(p)!r}: no {kind} files for this {modality} tokenizer")
    return [(str(f.relative_to(p)) if p.is_dir() else f.name, f) for f in files]


def _id_dtype(codebook_size: int) -> np.dtype:
    return np.dtype(np.uint16) if codebook_size <= 65536 else np.dtype(np.int32)


class TokenizeFn:
    """Files -> ids with one Tokenizer (built once: in this process, or once per Ray Data actor)."""

    def __init__(self, model: str, vae: str | None, device: str = "cpu", batch_size: int = 32):
        from revq_ray.tokenizer import Tokenizer

        self.tok = Tokenizer.from_pretrained(model, device=device, vae=vae)
        self.batch_size = batch_size
        self.dtype = _id_dtype(self.tok.codebook_size)

    def one(self, name: str, path: str) -> dict[str, Any]:
        """One file -> {"name", "ids" (npy bytes), "meta" (JSON)}; ``error`` instead when unreadable."""
        tok = self.tok
        try:
            meta: dict[str, Any] = {"name": name}
            if tok.modality == "audio":
                import soundfile as sf

                data, sr = sf.read(path, dtype="float32", always_2d=True)
                ids = tok.encode(data.mean(axis=1), sample_rate=int(sr), batch_size=self.batch_size)
                arr = ids.item_windows(0).numpy()
                meta.update(length=int(ids.lengths[0]), source_rate=int(sr), source_length=len(data))
                meta.update(windows=int(ids.windows[0]))
            else:
                from PIL import Image

                with Image.open(path) as im:
                    arr = tok.encode(im.convert("RGB"))[0].numpy()
            meta["shape"] = list(arr.shape)
            buf = io.BytesIO()
            np.save(buf, arr.astype(self.dtype), allow_pickle=False)
            return {"name": name, "ids": buf.getvalue(), "meta": json.dumps(meta), "error": ""}
        except Exception as err:  # corrupt input: skipped and counted, never fatal
            return {"name": name, "ids": b"", "meta": "", "error": f"{type(err).__name__}: {err}"}

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        rows = [self.one(str(n), str(p)) for n, p in zip(batch["name"], batch["path"])]
        return {k: np.array([r[k] for r in rows], dtype=object) for k in ("name", "ids", "meta", "error")}


def _stream(
    items: list[tuple[str, Path]], args: argparse.Namespace, log: Callable[[str], None]
) -> Iterator[dict[str, Any]]:
    """Tokenized rows in input order: through Ray Data for large inputs, else in this process."""
    use_ray = args.ray == "always" or (args.ray == "auto" and len(items) > args.ray_threshold)
    if not use_ray:
        fn = TokenizeFn(args.model, args.vae, args.device, args.batch_size)
        for name, path in items:
            yield fn.one(name, str(path))
        return
    import ray

    from revq_ray.runtime import init_ray

    init_ray()
    ds = ray.data.from_items([{"name": n, "path": str(p)} for n, p in items])
    ds = ds.map_batches(
        TokenizeFn,
        fn_constructor_args=(args.model, args.vae, args.device, args.batch_size),
        batch_size=16,
        concurrency=args.workers,
        num_cpus=1,
        batch_format="numpy",
    )
    log(f"[tokenize] streaming {len(items)} files through Ray Data ({args.workers} tokenizer actor(s))")
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

    def write(self, ids: bytes, meta: dict[str, Any]) -> None:
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
            self._add(f"{key}.json", json.dumps(meta).encode())
            meta["shard"] = self.shard_names[-1]
        self.items.append(meta)

    def close(self) -> None:
        if self._tar is not None:
            self._tar.close()
            self._tar = None


def tokenize(args: argparse.Namespace, log: Callable[[str], None] = print) -> dict[str, Any]:
    """Run ``revq-ray tokenize`` (see the module docstring); returns the manifest."""
    from revq_ray.data import fs as _fs
    from revq_ray.runtime import is_uri
    from revq_ray.tokenizer import Tokenizer

    t0 = time.perf_counter()
    remote = str(args.output) if is_uri(args.output) else None
    if remote:  # fail in seconds, before any model is loaded, when the store cannot take the output
        _fs.check_location(remote, write=True)
    probe = Tokenizer.from_pretrained(args.model, vae=args.vae)  # shapes, modality; checks the model early
    items = list_inputs(args.input, probe.modality)
    shards = args.format == "shards" or (args.format == "auto" and len(items) > NPY_MAX_FILES)
    # A URI output is written into a local staging folder, then uploaded whole (manifest last).
    out = Path(tempfile.mkdtemp(prefix="revq_tokens_")) if remote else Path(args.output).expanduser()
    out.mkdir(parents=True, exist_ok=True)
    writer, skipped = _Writer(out, shards, args.shard_size), []
    log(f"[tokenize] {len(items)} {probe.modality} files from {args.input} with {probe!r}")
    for row in _stream(items, args, log):
        if row["error"]:
            skipped.append(f"{row['name']}: {row['error']}")
            continue
        writer.write(row["ids"], json.loads(row["meta"]))
        if len(writer.items) % 500 == 0:
            log(f"[tokenize] {len(writer.items)}/{len(items)} files ({time.perf_counter() - t0:.0f}s)")
    writer.close()
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
        "layout": LAYOUT,
        "dtype": str(_id_dtype(probe.codebook_size)),
        "input": str(args.input),
        "count": len(writer.items),
        "skipped": skipped,
        "shards": writer.shard_names,
        "items": writer.items,
    }
    (out / MANIFEST).write_text(json.dumps(manifest, indent=1))
    if remote:
        _fs.upload_tree(out, remote, skip=(MANIFEST,))
        _fs.upload_tree(out, remote, skip=tuple(p.name for p in out.iterdir() if p.name != MANIFEST))
        shutil.rmtree(out, ignore_errors=True)
    where = f"{len(writer.shard_names)} webdataset shards" if shards else "ids/*.npy"
    log(
        f"[tokenize] {len(writer.items)} files -> {where} + {MANIFEST} in {remote or out} "
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


def _media_name(name: str, modality: str) -> str:
    stem = str(Path(name).with_suffix(""))
    return stem + (".wav" if modality == "audio" else ".png")


class DetokenizeFn:
    """(item metadata, ids) -> a media file under ``out`` (one Tokenizer per process or Ray Data actor)."""

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
        dst = self.out / _media_name(meta["name"], tok.modality)
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
            fn.one(meta, ids)
            written += 1
    else:
        import ray

        from revq_ray.runtime import init_ray

        init_ray()

        def rows() -> Iterator[dict[str, Any]]:
            for meta, ids in items:
                buf = io.BytesIO()
                np.save(buf, ids, allow_pickle=False)
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
    p.add_argument("--input", required=True, help="an image or audio folder, or one file")
    p.add_argument("--output", required=True, help="directory for ids and manifest.json")
    p.add_argument(
        "--format", choices=("auto", "npy", "shards"), default="auto", help="auto: npy <= 1000 files"
    )
    p.add_argument("--shard-size", type=int, default=1000, help="files per webdataset shard")
    p.add_argument("--batch-size", type=int, default=32, help="audio windows per VAE batch")
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
        len(skipped), manifest["count"] + len(skipped), args.max_skip_fraction, skipped[0] if skipped else ""
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
