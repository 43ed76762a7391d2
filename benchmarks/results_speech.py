"""README results, audio: real speech through the built-in mel VAE, tokenized by ReVQ, with the commands a
user runs (``python -m revq_ray.vae / encode / train / eval``).

    python benchmarks/results_speech.py [--shared ../shared] [--out runs/results_speech] [--vae-steps 1500]

1. every 8th file of ``../shared/data/speech16k`` is held out (linked into ``<out>/val_audio``), the rest
   into ``<out>/train_audio``;
2. ``python -m revq_ray.vae --config configs/vae_speech.yaml`` trains the mel VAE on the training files;
3. ``python -m revq_ray.encode`` writes latent shards of both splits (1.5 s crops, with log-variances);
4. ``python -m revq_ray.train --config configs/audio_speech.yaml`` trains ReVQ on them;
5. ``python -m revq_ray.eval`` scores the held-out files: mel MSE, SNR and STOI of the VAE alone and of the
   tokenized round trip (waveforms through Griffin-Lim), and writes wav files and mel images.

Prints a markdown table and writes ``benchmarks/results/results_speech.json``. Re-running resumes.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _log(msg: str) -> None:
    print(f"[results_speech] {msg}", flush=True)


def _run(cmd: list[str]) -> float:
    _log("$ " + " ".join(cmd))
    t = time.perf_counter()
    subprocess.run(cmd, cwd=ROOT, check=True)
    return time.perf_counter() - t


def split_files(src: Path, out: Path, every: int) -> tuple[Path, Path, int, int]:
    train, val = out / "train_audio", out / "val_audio"
    train.mkdir(parents=True, exist_ok=True)
    val.mkdir(parents=True, exist_ok=True)
    files = sorted(src.glob("*.flac"))
    for i, f in enumerate(files):
        dst = (val if i % every == 0 else train) / f.name
        if not dst.exists():
            dst.symlink_to(f.resolve())
    return train, val, len(list(train.iterdir())), len(list(val.iterdir()))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--shared", type=Path, default=Path(os.environ.get("REVQ_SHARED", ROOT.parent / "shared")))
    p.add_argument("--out", type=Path, default=ROOT / "runs" / "results_speech")
    p.add_argument("--vae-steps", type=int, default=1500)
    p.add_argument("--epochs", type=int, default=15)
    p.add_argument("--json", type=Path, default=ROOT / "benchmarks" / "results" / "results_speech.json")
    args = p.parse_args(argv)
    src = args.shared / "data" / "speech16k"
    if not src.is_dir():
        print(f"error: needs {src} (the development assets in ../shared)", file=sys.stderr)
        return 2
    py = sys.executable
    out = args.out.resolve()
    train_audio, val_audio, n_train, n_val = split_files(src, out, 8)
    _log(f"{n_train} training files, {n_val} held-out files")
    vae_dir, shards, val_shards = out / "mel_vae", out / "latents" / "train", out / "latents" / "val"
    times = {}
    if not (vae_dir / "config.json").is_file():
        times["vae_s"] = _run(
            [py, "-m", "revq_ray.vae", "--config", "configs/vae_speech.yaml", "--set", f"input={train_audio}",
             "--set", f"output={vae_dir}", "--set", f"steps={args.vae_steps}"]
        )  # fmt: skip
    t = 0.0
    for audio, dst in ((train_audio, shards), (val_audio, val_shards)):
        t += _run(
            [py, "-m", "revq_ray.encode", "--input", str(audio), "--vae", f"builtin:{vae_dir}", "--output",
             str(dst), "--logvar", "--shard-size", "256"]
        )  # fmt: skip
    times["encode_s"] = t
    times["train_s"] = _run(
        [py, "-m", "revq_ray.train", "--config", "configs/audio_speech.yaml", "--set", f"output_dir={out}",
         "--set", f"vae=builtin:{vae_dir}", "--set", f"data.shards={shards}", "--set",
         f"data.val_shards={val_shards}", "--set", f"train.epochs={args.epochs}"]
    )  # fmt: skip
    run_dir = out / "audio_speech"
    times["eval_s"] = _run(
        [py, "-m", "revq_ray.eval", "--model", str(run_dir), "--input", str(val_audio), "--output",
         str(out / "eval"), "--limit", "0"]
    )  # fmt: skip
    metrics = json.loads((out / "eval" / "metrics.json").read_text())
    res = {
        "what": "speech16k -> built-in mel VAE (22,050 Hz, 80 mels, latent 16x32 per 1.5 s) -> ReVQ; "
        "metrics on held-out files",
        "command": "python benchmarks/results_speech.py "
        + " ".join(argv if argv is not None else sys.argv[1:]),
        "train_files": n_train,
        "val_files": n_val,
        "vae_steps": args.vae_steps,
        "epochs": args.epochs,
        "times_s": {k: round(v, 1) for k, v in times.items()},
        "machine": f"{platform.machine()}, {os.cpu_count()} CPU cores, no GPU",
        "summary": metrics.get("summary", metrics),
        "report": str(out / "eval" / "report.md"),
    }
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(res, indent=2, default=str))
    print(json.dumps(res["summary"], indent=2, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
