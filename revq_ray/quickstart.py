"""``revq-ray quickstart``: the whole pipeline, offline, on real photos, in a few minutes on a laptop CPU.

    python -m revq_ray quickstart [--output runs/quickstart] [--fast]

1. photos   random 64x64 crops of the photographs bundled with scikit-image (``skimage.data``: astronaut,
            rocket, camera, coins, hubble, ...) written as PNG files; two photos (chelsea the cat, coffee)
            are held out entirely for validation and evaluation
2. vae      a small built-in Gaussian image VAE (``ImageConvVAE``) trained on them for a few minutes
            (``revq_ray.vae.train``): 64x64 RGB -> latent (8, 8, 8)
3. encode   the crops -> latent shards through Ray Data (``revq_ray.encode``)
4. train    ReVQ (grouped codebooks, non-activation reset, ViT rectifier) through Ray Train + DeepSpeed
            (``revq_ray.train``)
5. eval     metrics and a report on the held-out photos (``revq_ray.eval``), and a Tokenizer bundle

Nothing is downloaded. Re-running reuses what is already there (photos, the VAE, finished shards, the
finished training run), so an interrupted quickstart continues where it stopped. ``--fast`` shrinks every
stage (tests, smoke checks); ``--fresh`` starts over.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import re
import shutil
import sys
import threading
import time
import traceback
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, TextIO

import numpy as np

TRAIN_PHOTOS = (
    "astronaut",
    "rocket",
    "camera",
    "coins",
    "hubble_deep_field",
    "immunohistochemistry",
    "retina",
    "stereo_motorcycle",
    "brick",
    "grass",
    "gravel",
    "moon",
    "cell",
    "clock",
)
VAL_PHOTOS = ("chelsea", "coffee")
STAGES = ("photos", "vae", "encode", "train", "eval")


@dataclass(frozen=True)
class Sizes:
    """Every size the quickstart uses; ``FULL`` is the default, ``FAST`` is for tests."""

    crop: int = 64  # crop side written to disk
    train_crops: int = 2048
    val_crops: int = 128
    image_size: int = 64  # VAE input size (crops are resized when different)
    vae_width: int = 16
    vae_latent_channels: int = 8
    vae_steps: int = 1000
    vae_batch: int = 32
    vae_lr: float = 2e-3
    vae_kl_weight: float = 1e-4
    tokens: int = 128  # latent (8, 8, 8) = 512 values -> 128 tokens of d = 4
    codebook_size: int = 256  # 128 * log2(256) = 1,024 bits per 64x64 image
    rect_width: int = 64
    rect_depth: int = 1
    train_steps: int = 400
    batch_size: int = 64
    lr: float = 0.01
    reset_interval: int = 50
    eval_items: int = 128


FULL = Sizes()
FAST = Sizes(
    crop=32,
    train_crops=160,
    val_crops=24,
    image_size=32,
    vae_width=8,
    vae_latent_channels=4,
    vae_steps=20,
    vae_batch=16,
    tokens=16,
    codebook_size=16,
    rect_width=16,
    rect_depth=1,
    train_steps=6,
    batch_size=16,
    reset_interval=3,
    eval_items=24,
)


LOG_FILE = "quickstart.log"

# Follows the log while ``quiet_console`` sends file descriptors 1 and 2 (everything Ray, DeepSpeed, torch
# and their C++ parts print) to the log file, and writes to the terminal; None when nothing is redirected.
_TAIL: _LogTail | None = None


def _log(msg: str) -> None:
    """A line for the newcomer: on the terminal, and in the log file too while the console is quiet."""
    line = f"[quickstart] {msg}"
    print(line, flush=True)  # fd 1: the terminal, or the log file in quiet mode (keeps the log readable)
    if _TAIL is not None:
        _TAIL.drain()  # progress lines already in the log come first, in order
        _TAIL.write(line)


class ProgressFilter:
    """Picks the few log lines worth echoing to the terminal: the VAE's and the trainer's step lines at the
    first step, half-way and the end, and the line saying DeepSpeed's engine is ready (the worker start-up
    before it takes a minute on a busy CPU). Everything else stays in the log only."""

    _VAE = re.compile(r"\[revq_ray\.vae\] step=(\d+) loss=(\S+).*?val_psnr=(\S+)")
    _TRAIN = re.compile(r"\[revq_ray\.train\] (step (\d+)/(\d+) .*)$")
    _READY = re.compile(r"\[revq_ray\.train\] (DeepSpeed engine ready.*)$")

    def __init__(self, vae_steps: int):
        self.vae_steps = vae_steps
        self._shown: dict[str, int] = {}  # stage -> last half shown (0 = the first step)

    def _due(self, stage: str, step: int, total: int) -> bool:
        half = 2 * step // max(total, 1)  # 0 before half-way, 1 from there, 2 at the end
        if step == 1 and stage not in self._shown:
            self._shown[stage] = 0
            return True
        if half > self._shown.get(stage, -1):
            self._shown[stage] = half
            return True
        return False

    def __call__(self, line: str) -> str | None:
        if m := self._VAE.search(line):
            step = int(m.group(1))
            if self._due("vae", step, self.vae_steps):
                return (
                    f"[2/5] vae: step {step}/{self.vae_steps} loss {m.group(2)} "
                    f"val PSNR {float(m.group(3)):.2f} dB"
                )
            return None
        if m := self._TRAIN.search(line):
            if not self._due("train", int(m.group(2)), int(m.group(3))):
                return None
            # "step 1/6 (17%) ep 0.1 | loss 0.9 (quant ..) | val 0.3 (norect ..) | usage .. | eta 0m56s"
            keep = [p for p in m.group(1).split(" | ") if p.split(" ")[0] in ("step", "loss", "val", "eta")]
            return "[4/5] train: " + " | ".join(p.split(" (")[0] if p[:4] != "step" else p for p in keep)
        if m := self._READY.search(line):
            return f"[4/5] train: {m.group(1)}"
        return None


class _LogTail(threading.Thread):
    """Follows the log file from ``offset`` and writes what ``pick`` returns for each line to ``console``."""

    def __init__(self, path: Path, offset: int, console: TextIO, pick: Callable[[str], str | None]):
        super().__init__(daemon=True, name="quickstart-log-tail")
        self.path, self.offset, self.console, self.pick = path, offset, console, pick
        self._stop_event = threading.Event()
        self._lock = threading.Lock()  # the thread and _log both drain
        self._partial = b""

    def write(self, line: str) -> None:
        self.console.write(line + "\n")
        self.console.flush()

    def drain(self) -> None:
        with self._lock:
            with open(self.path, "rb") as f:
                f.seek(self.offset)
                data = f.read()
            self.offset += len(data)
            *lines, self._partial = (self._partial + data).split(b"\n")
            for raw in lines:
                shown = self.pick(raw.decode("utf-8", "replace"))
                if shown:
                    self.write(f"[quickstart] {shown}")

    def run(self) -> None:
        while not self._stop_event.wait(0.5):
            self.drain()

    def stop(self) -> None:
        self._stop_event.set()
        self.join()
        self.drain()


@contextlib.contextmanager
def quiet_console(log_path: Path, pick: Callable[[str], str | None]) -> Iterator[None]:
    """Send file descriptors 1 and 2 to ``log_path`` (appended), so that whatever Ray, DeepSpeed and torch
    print (Python warnings, logging, C++ ``core_worker.cc`` lines, the lines Ray forwards from its workers)
    lands in the log, and the terminal shows only ``_log`` lines and what ``pick`` selects from the log.

    Redirecting the descriptors, not ``sys.stdout``, is what catches the C++ parts and the child processes
    Ray starts (they inherit them). Restored on exit, also on errors."""
    global _TAIL
    sys.stdout.flush()
    sys.stderr.flush()
    saved_out, saved_err = os.dup(1), os.dup(2)
    log_fd = os.open(log_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    os.write(log_fd, f"\n===== revq-ray quickstart {time.strftime('%Y-%m-%d %H:%M:%S')} =====\n".encode())
    console = os.fdopen(os.dup(saved_out), "w", buffering=1)
    tail = _LogTail(log_path, os.lseek(log_fd, 0, os.SEEK_END), console, pick)
    os.dup2(log_fd, 1)
    os.dup2(log_fd, 2)
    # sys.stdout is usually fd 1 already; not under a notebook or a capturing test runner
    py_log = os.fdopen(os.dup(log_fd), "a", buffering=1)
    _TAIL = tail
    tail.start()
    try:
        with contextlib.redirect_stdout(py_log), contextlib.redirect_stderr(py_log):
            try:
                yield
            except BaseException:
                traceback.print_exc()  # into the log; main() shows its tail
                raise
    finally:
        py_log.close()
        sys.stdout.flush()
        sys.stderr.flush()
        tail.stop()
        os.dup2(saved_out, 1)
        os.dup2(saved_err, 2)
        for fd in (saved_out, saved_err, log_fd):
            os.close(fd)
        _TAIL = None
        console.close()


def _load_photo(name: str):
    from PIL import Image
    from skimage import data

    a = getattr(data, name)()
    if isinstance(a, tuple):  # stereo_motorcycle -> (left, right, disparity)
        a = a[0]
    if a.dtype == bool:
        a = a.astype(np.uint8) * 255
    if a.ndim == 2:
        a = np.stack([a] * 3, -1)
    return Image.fromarray(np.ascontiguousarray(a[..., :3]))


def write_photo_crops(out_dir: Path, photos: Sequence[str], n: int, crop: int, seed: int) -> int:
    """``n`` random ``crop`` x ``crop`` PNG crops of ``photos`` (several scales, random flips) in ``out_dir``.

    The photos are scaled down first (to 15-50% of their size) so that a crop holds objects and edges, not
    just a patch of one flat surface. Returns the number of files written.
    """
    from PIL import Image

    rng = np.random.default_rng(seed)
    out_dir.mkdir(parents=True, exist_ok=True)
    scaled: dict[str, list[Any]] = {}
    for name in photos:
        im = _load_photo(name)
        w, h = im.size
        versions = []
        for s in (0.15, 0.22, 0.32, 0.5):  # a few fixed scales: resizing a 1,400 px photo per crop is slow
            sw, sh = max(crop + 1, round(w * s)), max(crop + 1, round(h * s))
            versions.append(im.resize((sw, sh), Image.BICUBIC))
        scaled[name] = versions
    for i in range(n):
        name = photos[i % len(photos)]
        im = scaled[name][rng.integers(len(scaled[name]))]
        x = int(rng.integers(0, im.size[0] - crop + 1))
        y = int(rng.integers(0, im.size[1] - crop + 1))
        tile = im.crop((x, y, x + crop, y + crop))
        if rng.random() < 0.5:
            tile = tile.transpose(Image.FLIP_LEFT_RIGHT)
        tile.save(out_dir / f"{name}_{i:05d}.png")
    return n


DOWNSTREAM = {
    "photos": ("vae", "latents", "train", "eval", "tokenizer"),
    "vae": ("latents", "train", "eval", "tokenizer"),
}


def _invalidate(out: Path, stage: str) -> None:
    """A stage was (re)computed: whatever was built from its old output is stale (the encode resume check
    knows the VAE by its spec, not its weights, and a training run resumes by name), so remove it."""
    for name in DOWNSTREAM[stage]:
        if (out / name).exists():
            _log(f"removing {out / name} (built from the previous {stage})")
            shutil.rmtree(out / name)


def _stage_photos(out: Path, sz: Sizes) -> tuple[Path, Path]:
    root = out / "photos"
    marker = root / "photos.json"
    want = {
        "train": list(TRAIN_PHOTOS),
        "val": list(VAL_PHOTOS),
        "train_crops": sz.train_crops,
        "val_crops": sz.val_crops,
        "crop": sz.crop,
        "seed": 0,
    }
    if marker.is_file() and json.loads(marker.read_text()) == want:
        _log(f"[1/5] photos: reusing {root}")
        return root / "train", root / "val"
    if root.exists():
        shutil.rmtree(root)
    _invalidate(out, "photos")
    t0 = time.perf_counter()
    n_tr = write_photo_crops(root / "train", TRAIN_PHOTOS, sz.train_crops, sz.crop, seed=0)
    n_va = write_photo_crops(root / "val", VAL_PHOTOS, sz.val_crops, sz.crop, seed=1)
    marker.write_text(json.dumps(want, indent=1))
    _log(
        f"[1/5] photos: {n_tr} train crops of {len(TRAIN_PHOTOS)} skimage photos, "
        f"{n_va} val crops of the held-out "
        f"{' and '.join(VAL_PHOTOS)} -> {root} ({time.perf_counter() - t0:.1f}s)"
    )
    return root / "train", root / "val"


def _same_vae_config(saved: Path, cfg: Any) -> bool:
    """Whether the VAE in ``saved``'s directory was trained with ``cfg`` (thread count aside: it changes
    with the machine's load, not the model)."""
    import yaml

    if not saved.is_file():
        return False
    try:
        old = yaml.safe_load(saved.read_text()) or {}
    except yaml.YAMLError:
        return False
    new = cfg.model_dump(mode="json")
    for d in (old, new):
        d.pop("torch_threads", None)
    return old == new


def _stage_vae(out: Path, train_dir: Path, sz: Sizes, threads: int) -> str:
    from revq_ray.vae.train import VAETrainConfig, train_vae

    vae_dir = out / "vae"
    cfg = VAETrainConfig(
        input=str(train_dir),
        modality="image",
        output=str(vae_dir),
        image_size=sz.image_size,
        width=sz.vae_width,
        latent_channels=sz.vae_latent_channels,
        kl="plain",
        kl_weight=sz.vae_kl_weight,
        steps=sz.vae_steps,
        batch_size=sz.vae_batch,
        lr=sz.vae_lr,
        log_every=max(1, sz.vae_steps // 10),
        val_items=min(128, sz.train_crops // 8),
        device="cpu",
        torch_threads=threads,
        seed=0,
    )
    if (vae_dir / "revq_vae.json").is_file() and _same_vae_config(vae_dir / "train_config.yaml", cfg):
        _log(f"[2/5] vae: reusing the trained VAE in {vae_dir}")
    else:
        _log(
            f"[2/5] vae: training a built-in Gaussian VAE ({sz.image_size}x{sz.image_size} RGB -> latent "
            f"({sz.vae_latent_channels}, {sz.image_size // 8}, {sz.image_size // 8})) "
            f"for {sz.vae_steps} steps"
        )
        _invalidate(out, "vae")
        t0 = time.perf_counter()
        train_vae(cfg)
        _log(f"[2/5] vae: done in {time.perf_counter() - t0:.1f}s -> {vae_dir}")
    return f"builtin:{vae_dir}"


def _stage_encode(out: Path, train_dir: Path, val_dir: Path, spec: str, sz: Sizes) -> tuple[Path, Path]:
    from revq_ray.data.encode import encode_to_shards

    t0 = time.perf_counter()
    paths = {}
    for split, src in (("train", train_dir), ("val", val_dir)):
        dst = out / "latents" / split
        res = encode_to_shards(
            str(src),
            spec,
            str(dst),
            shard_size=512,
            batch_size=64,
            num_actors=1,
            device="cpu",
            cpus_per_actor=1.0,
            progress=True,
        )
        paths[split] = dst
        print(f"[quickstart] [3/5] encode {split}: {res.summary()}", flush=True)  # the log, in quiet mode
        m = res.manifest
        _log(f"[3/5] encode {split}: {m.count} latents ({m.num_skipped} skipped) in {len(m.shards)} shards")
    _log(f"[3/5] encode: latents in {out / 'latents'} ({time.perf_counter() - t0:.1f}s)")
    return paths["train"], paths["val"]


def train_config(
    out: Path, spec: str, shards: Path, val_shards: Path, sz: Sizes, threads: int
) -> dict[str, Any]:
    """The quickstart's training preset: configs/debug.yaml's shape (1 CPU worker, ZeRO 0, fp32, small ViT
    rectifier), pointed at the photo latents, with step-based resets and a fixed number of steps."""
    return {
        "name": "train",
        "output_dir": str(out),
        "seed": 0,
        "vae": spec,
        "data": {
            "shards": str(shards),
            "val_shards": str(val_shards),
            "shuffle_buffer": 512,
            "prefetch_batches": 1,
        },
        "model": {
            "quantizer": {
                "type": "revq",
                "tokens": sz.tokens,
                "codebook_size": sz.codebook_size,
                "init": "sample",
                "reset": {"enabled": True, "unit": "steps", "interval": sz.reset_interval},
            },
            "rectifier": {"type": "vit", "width": sz.rect_width, "depth": sz.rect_depth, "head_dim": 16},
        },
        "train": {
            "num_workers": 1,
            "use_gpu": False,
            "cpus_per_worker": 1,
            "torch_threads": threads,
            "zero_stage": 0,
            "precision": "fp32",
            "batch_size": sz.batch_size,
            "epochs": 1000,
            "max_steps": sz.train_steps,
            "lr": sz.lr,
            "log_every": max(1, sz.train_steps // 16),
            "val_every": max(1, sz.train_steps // 8),
            "checkpoint_every": max(1, sz.train_steps // 2),
            "keep_checkpoints": 1,
            "max_failures": 0,
        },
    }


def _stage_train(out: Path, cfg_dict: dict[str, Any]) -> Path:
    from revq_ray.config import parse_config
    from revq_ray.train import run

    cfg = parse_config(cfg_dict)
    q = cfg.model.quantizer
    _log(
        f"[4/5] train: ReVQ T={q.tokens} x K={q.codebook_size} ({q.bits_per_sample:g} bits/image), "
        f"{cfg.model.rectifier.type} rectifier, {cfg.train.max_steps} steps "
        "through Ray Train + DeepSpeed (CPU)"
    )
    t0 = time.perf_counter()
    result = run(cfg)
    err = getattr(result, "error", None)
    if err:
        raise RuntimeError(f"training failed: {err}")
    m = result.metrics or {}
    run_dir = Path(m.get("run_dir") or out / cfg.name)
    _log(
        f"[4/5] train: done in {time.perf_counter() - t0:.1f}s; "
        f"val latent MSE {m.get('val_mse', math.nan):.4f} "
        f"(without rectifier {m.get('val_mse_norect', math.nan):.4f}); model in {run_dir / 'export' / 'best'}"
    )
    return run_dir


def _stage_eval(out: Path, run_dir: Path, val_dir: Path, spec: str, sz: Sizes) -> dict[str, Any]:
    from revq_ray.eval.evaluate import evaluate
    from revq_ray.tokenizer import Tokenizer

    t0 = time.perf_counter()
    _log(f"[5/5] eval: scoring the tokenizer on {sz.eval_items} held-out crops")
    res = evaluate(
        run_dir,
        val_dir,
        out / "eval",
        vae=spec,
        limit=sz.eval_items,
        device="cpu",
        log=lambda s: print(f"[quickstart] [5/5] {s}", flush=True),  # details: the log file in quiet mode
        # Offline by promise: rFID / LPIPS only when their weights are already cached, never a download.
        download=False,
    )
    tok = Tokenizer.build(spec, run_dir)
    tok.save_pretrained(out / "tokenizer")
    _log(f"[5/5] eval: report and Tokenizer bundle written ({time.perf_counter() - t0:.1f}s)")
    return res


def _prepare_env() -> None:
    # Before Ray starts: workers inherit these. Progress bars of Ray Data would interleave with our lines.
    os.environ.setdefault("RAY_DATA_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("RAY_TRAIN_V2_ENABLED", "1")
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    from revq_ray.runtime import extensions_dir

    os.environ.setdefault("TORCH_EXTENSIONS_DIR", str(extensions_dir()))


def default_threads() -> int:
    """Torch threads for the in-process stages: the cores (at most 4), but 1 on a machine that is already
    busy (load average >= cores), where OpenMP threads stall at every barrier waiting for a descheduled
    sibling and one thread is several times faster than two."""
    cores = os.cpu_count() or 1
    try:
        busy = os.getloadavg()[0] >= cores
    except OSError:  # pragma: no cover - no load average on this platform
        busy = False
    return 1 if busy else max(1, min(cores, 4))


def run_quickstart(
    output: str | Path = "runs/quickstart",
    fast: bool = False,
    fresh: bool = False,
    threads: int | None = None,
    verbose: bool = False,
) -> dict[str, Any]:
    """Run (or resume) the five stages; returns a summary dict (also written to ``<output>/summary.json``).

    The terminal gets stage progress and the summary; everything else (Ray's and DeepSpeed's messages, every
    training step) goes to ``<output>/quickstart.log``, which the summary names. ``verbose`` prints it all."""
    _prepare_env()
    sz = FAST if fast else FULL
    out = Path(output).expanduser().resolve()
    if fresh and out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)
    log_path = out / LOG_FILE
    quiet = contextlib.nullcontext() if verbose else quiet_console(log_path, ProgressFilter(sz.vae_steps))
    with quiet:
        summary = _run_stages(out, sz, fast, threads)
        summary["log"] = None if verbose else str(log_path)
        (out / "summary.json").write_text(json.dumps(summary, indent=2))
    print(format_summary(summary), flush=True)
    return summary


def _run_stages(out: Path, sz: Sizes, fast: bool, threads: int | None) -> dict[str, Any]:
    import torch

    threads = threads or default_threads()
    torch.set_num_threads(threads)
    t_all = time.perf_counter()
    times: dict[str, float] = {}
    _log(
        f"output {out} ({'fast' if fast else 'full'} sizes; {threads} torch threads); "
        "offline, nothing is downloaded"
    )

    t = time.perf_counter()
    train_dir, val_dir = _stage_photos(out, sz)
    times["photos"] = time.perf_counter() - t
    t = time.perf_counter()
    spec = _stage_vae(out, train_dir, sz, threads)
    times["vae"] = time.perf_counter() - t

    import ray

    from revq_ray.runtime import init_ray

    t = time.perf_counter()
    print("[quickstart] [3/5] encode: starting a local Ray", flush=True)
    init_ray()
    try:
        shards, val_shards = _stage_encode(out, train_dir, val_dir, spec, sz)
        times["encode"] = time.perf_counter() - t
        t = time.perf_counter()
        run_dir = _stage_train(out, train_config(out, spec, shards, val_shards, sz, threads))
        times["train"] = time.perf_counter() - t
    finally:
        ray.shutdown()
    t = time.perf_counter()
    res = _stage_eval(out, run_dir, val_dir, spec, sz)
    times["eval"] = time.perf_counter() - t
    times["total"] = time.perf_counter() - t_all
    return {
        "output": str(out),
        "report": str(out / "eval" / "report.md"),
        "tokenizer": str(out / "tokenizer"),
        "vae": spec,
        "sizes": asdict(sz),
        "seconds": {k: round(v, 1) for k, v in times.items()},
        "metrics": res["summary"],
    }


def format_summary(summary: dict[str, Any]) -> str:
    m = summary["metrics"]
    sz = summary["sizes"]

    F3, F4, PCT = "{:.3f}", "{:.4f}", "{:.1%}"

    def f(key: str, fmt: str = "{:.2f}") -> str:
        v = m.get(key)
        return "-" if v is None or (isinstance(v, float) and math.isnan(v)) else fmt.format(v)

    rows = [
        ("held-out photos evaluated", f"{m.get('items', '-')} crops of {', '.join(VAL_PHOTOS)}"),
        ("VAE only (continuous latent)", f"PSNR {f('psnr_vae_only')} dB  SSIM {f('ssim_vae_only', F3)}"),
        ("ReVQ tokens, with rectifier", f"PSNR {f('psnr_tokenized')} dB  SSIM {f('ssim_tokenized', F3)}"),
        ("ReVQ tokens, without rectifier", f"PSNR {f('psnr_tokenized_without_rectifier')} dB"),
        (
            "latent MSE (std units) w/o -> with rectifier",
            f"{f('latent_mse_std_without_rectifier', F4)} -> {f('latent_mse_std_with_rectifier', F4)}",
        ),
        ("tokens per image", f"{sz['tokens']} ids in [0, {sz['codebook_size']})"),
        ("bits per image / per pixel", f"{f('bits_per_sample', '{:g}')} / {f('bits_per_pixel', '{:.3f}')}"),
        (
            "codebook usage / perplexity/K (eval set)",
            f"{f('usage_mean', PCT)} / {f('perplexity_over_K', PCT)}",
        ),
    ]
    s = summary["seconds"]
    rows.append(
        (
            "wall time",
            f"{s.get('total', 0):.0f}s (" + ", ".join(f"{k} {s.get(k, 0):.0f}" for k in STAGES) + ")",
        )
    )
    width = max(len(k) for k, _ in rows)
    line = "-" * (width + 50)
    body = "\n".join(f"  {k:<{width}}  {v}" for k, v in rows)
    out = summary["output"]
    tail = [f"report:    {summary['report']}"]
    if summary.get("log"):
        tail.append(f"log:       {summary['log']}   (Ray's and DeepSpeed's messages, every training step)")
    tail += [
        f"tokenizer: {summary['tokenizer']}   (revq_ray.Tokenizer.from_pretrained(...).encode(images))",
        f"next:      revq-ray compare --shards {out}/latents/train --val-shards {out}/latents/val "
        f"--bits {int(sz['tokens'] * math.log2(sz['codebook_size']))} --output {out}/compare",
    ]
    return f"\n{line}\nrevq-ray quickstart summary\n{line}\n{body}\n{line}\n" + "\n".join(tail) + "\n"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="revq-ray quickstart",
        description="Offline end-to-end demo on real photos: built-in VAE -> Ray Data latents -> "
        "ReVQ with Ray "
        "Train + DeepSpeed -> evaluation report (README: measured time and memory); re-running resumes.",
    )
    p.add_argument("--output", default="runs/quickstart", help="output directory (default runs/quickstart)")
    p.add_argument("--fast", action="store_true", help="tiny sizes (a smoke test, ~1-2 minutes)")
    p.add_argument("--fresh", action="store_true", help="delete the output directory first")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: cores, at most 4)")
    p.add_argument(
        "--verbose",
        action="store_true",
        help=f"print everything (Ray, DeepSpeed, every step) instead of sending it to <output>/{LOG_FILE}",
    )
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        run_quickstart(
            args.output, fast=args.fast, fresh=args.fresh, threads=args.threads, verbose=args.verbose
        )
    except KeyboardInterrupt:
        _log("interrupted: re-run the same command to continue where it stopped")
        return 130
    except Exception as err:
        log_path = Path(args.output).expanduser().resolve() / LOG_FILE
        if args.verbose or not log_path.is_file():
            raise
        lines = log_path.read_text(errors="replace").splitlines()[-25:]
        print("\n".join(lines), file=sys.stderr)
        print(
            f"\n[quickstart] failed: {type(err).__name__}: {err}\n"
            f"[quickstart] above: the end of {log_path}, which holds everything; re-running continues "
            "where it stopped",
            file=sys.stderr,
        )
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
