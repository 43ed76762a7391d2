"""The quality study (issue 11): a recipe found by our own Ray Tune on Fashion-MNIST taef2 latents, checked on
held-out images against the recipe it replaces and against plain VQ, at 2,048 and 5,120 bits per image.

    python benchmarks/study_fmnist.py prepare        # encode + held-out PNGs (needs ../shared)
    python -m revq_ray.tune --config tuning/fashion_mnist_2048.yaml
    python -m revq_ray.tune --config tuning/fashion_mnist_5120.yaml
    python benchmarks/study_fmnist.py final          # train + evaluate the rows: table, JSON, plot

``prepare`` encodes the first ``--train-items`` (10,240) Fashion-MNIST training images at 64x64 through taef2
(latent 32x8x8). The sweeps train on 9,216 of them and rank trials on the other 1,024 (``data.val_items``: a
stable hash of their keys holds them out). The last ``--heldout`` (512) images of the file are written as
PNGs: they are the evaluation set, never trained on and never seen by a sweep.

``final`` trains every row for the study's budget (1,000 steps of 128 latents through Ray Train + DeepSpeed on
CPU) and scores it with ``revq_ray.eval`` on the held-out PNGs (image -> ids -> image):

- ``tuned``: ``configs/fashion_mnist_<bits>.yaml`` as committed: the sweep's winner, in the decoder-weighted
  position layout every trial ran in (``model.layout: position``, ``model.weighting: decoder``);
- ``unweighted``: the same winner in ReVQ's contiguous layout, every channel weighed alike (what the
  weighting adds);
- ``before``: the recipe the study replaces (the ImageNet presets' recipe at a CPU width: vit 64x2, codebook
  lr 0.01, rectifier lr x0.05, reset once per epoch; T256 K256 / T512 K1024), as measured in issue 11;
- ``authors_readme_lr`` (2,048 bits only): ``before`` with lr 5e-5, what the authors' README command runs
  (their argparse default replaces the yaml's 0.01);
- ``vq``: plain VQ at the sweep winner's T and K (no reset, no rectifier), same lr, contiguous and unweighted;
- ``vq_weighted``: the same plain VQ with the tuned layout and weighting.

Prints a markdown table; writes ``benchmarks/results/study_fmnist.json`` (sweep trials + rows) and
``benchmarks/results/study_fmnist.png``. Re-running resumes (finished runs and evaluations are kept); rows and
budgets a call does not run stay in the JSON as recorded, as long as their settings are still the config's.
"""

from __future__ import annotations

import argparse
import copy
import csv
import json
import os
import platform
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

BUDGETS = (2048, 5120)
OUT = ROOT / "runs" / "study_fmnist"
RESULTS = ROOT / "benchmarks" / "results"
# The recipe the study replaces, per budget (issue 11's table): (tokens, codebook size).
BEFORE_SHAPE = {2048: (256, 256), 5120: (512, 1024)}
AUTHORS_README_LR = 5e-5  # Neur-IO/ReVQ src/xvq/config.py: argparse default, assigned over the yaml's lr


def _log(msg: str) -> None:
    print(f"[study_fmnist] {msg}", flush=True)


def prepare(args: argparse.Namespace) -> int:
    """Encode the training latents and write the held-out PNGs (both resumable)."""
    from results_fmnist import write_val_pngs

    from revq_ray.data.encode import encode_to_shards
    from revq_ray.runtime import init_ray

    idx = args.shared / "data" / "fashion-mnist" / "train-images-idx3-ubyte.gz"
    taef2 = args.shared / "models" / "taef2"
    if not idx.is_file() or not taef2.is_dir():
        print(f"error: needs {idx} and {taef2} (the development assets in ../shared)", file=sys.stderr)
        return 2
    init_ray()
    heldout = write_val_pngs(idx, OUT / "heldout_png", args.heldout)
    res = encode_to_shards(
        str(idx), f"taesd:{taef2.resolve()}", str(OUT / "latents" / "train"), limit=args.train_items,
        image_size=64, shard_size=1024, batch_size=128, num_actors=2, device="cpu", progress=True,
    )  # fmt: skip
    _log(f"encode: {res.summary()}; held-out PNGs: {heldout}")
    return 0


def row_configs(bits: int) -> dict[str, dict[str, Any]]:
    """The rows of one budget as config dicts (the tuned preset and its variants)."""
    from revq_ray.config import load_yaml
    from revq_ray.runtime import set_dotted

    tuned = load_yaml(ROOT / "configs" / f"fashion_mnist_{bits}.yaml")
    tuned["output_dir"] = str(OUT / "runs")
    rows = {"tuned": tuned}
    # the same winner in ReVQ's contiguous layout, every channel weighed alike: what the weighting adds
    unweighted = copy.deepcopy(tuned)
    set_dotted(unweighted, "model.layout", "contiguous")
    set_dotted(unweighted, "model.weighting", "none")
    rows["unweighted"] = unweighted
    before = copy.deepcopy(unweighted)
    tokens, k = BEFORE_SHAPE[bits]
    for key, value in {
        "model.quantizer.tokens": tokens,
        "model.quantizer.codebook_size": k,
        "model.quantizer.loss": "decoupled",
        "model.quantizer.reset.dead_threshold": 1,
        "model.quantizer.reset.ratio": 0.2,
        "model.quantizer.reset.unit": "epochs",
        "model.quantizer.reset.interval": 1,
        "model.rectifier.type": "vit",
        "model.rectifier.width": 64,
        "model.rectifier.depth": 2,
        "model.rectifier.head_dim": 32,
        "train.lr": 0.01,
        "train.rectifier_lr_scale": 0.05,
    }.items():
        set_dotted(before, key, value)
    rows["before"] = before
    if bits == BUDGETS[0]:  # one budget answers the lr question
        authors = copy.deepcopy(before)
        set_dotted(authors, "train.lr", AUTHORS_README_LR)
        rows["authors_readme_lr"] = authors
    for name, base in (("vq", unweighted), ("vq_weighted", tuned)):
        vq = copy.deepcopy(base)
        set_dotted(vq, "model.quantizer.type", "vq")
        set_dotted(vq, "model.quantizer.reset.enabled", False)
        set_dotted(vq, "model.rectifier.type", "identity")
        rows[name] = vq
    for name, cfg in rows.items():
        cfg["name"] = f"fmnist{bits}_{name}"
    return rows


def _train_and_eval(cfg_data: dict[str, Any], spec: str, heldout: Path) -> dict[str, Any]:
    from revq_ray.config import parse_config
    from revq_ray.eval.evaluate import evaluate
    from revq_ray.train import run

    cfg = parse_config(cfg_data)
    run_dir = OUT / "runs" / cfg.name
    eval_dir = OUT / "eval" / cfg.name
    metrics_json = eval_dir / "metrics.json"
    t0 = time.perf_counter()
    if metrics_json.is_file():  # trained and evaluated by an earlier call
        ev = json.loads(metrics_json.read_text())
    else:
        result = run(cfg)  # resumes an interrupted run of the same name
        if result.error:
            raise RuntimeError(f"{cfg.name}: training failed: {result.error}")
        ev = evaluate(run_dir, heldout, eval_dir, vae=spec, limit=None, device="cpu", log=_log)
        ev["train_s"] = round(time.perf_counter() - t0, 1)
        metrics_json.write_text(json.dumps(ev, indent=2, default=str))
    return {
        **_row_settings(cfg),
        "train_and_eval_s": ev.get("train_s"),
        "summary": ev["summary"],
        "report": str(eval_dir / "report.md"),
    }


def _row_settings(cfg: Any) -> dict[str, Any]:
    """What a row of the table says about its run (also how a recorded row is matched to its config)."""
    q = cfg.model.quantizer
    return {
        "name": cfg.name,
        "tokens": q.tokens,
        "codebook_size": q.codebook_size,
        "bits_per_image": q.bits_per_sample,
        "quantizer": q.type,
        "layout": cfg.model.layout,
        "weighting": cfg.model.weighting,
        "rectifier": "none"
        if cfg.model.rectifier.type == "identity"
        else f"{cfg.model.rectifier.type} {cfg.model.rectifier.width}x{cfg.model.rectifier.depth}",
        "lr": cfg.train.lr,
        "rectifier_lr": cfg.train.lr * cfg.train.rectifier_lr_scale,
        "steps": cfg.train.max_steps,
        "batch_size": cfg.train.batch_size,
    }


def _recorded_row(previous: dict[str, Any], bits: int, row: str, cfg_data: dict[str, Any]) -> dict | None:
    """The row as an earlier ``final`` recorded it in the results JSON, if its settings are the config's."""
    from revq_ray.config import parse_config

    want = _row_settings(parse_config(cfg_data))
    for r in previous.get("budgets", {}).get(str(bits), {}).get("rows", []):
        if r.get("row") == row and all(
            r.get(k) == v if not isinstance(v, float) else abs(float(r.get(k, "nan")) - v) <= 1e-9 * abs(v)
            for k, v in want.items()
            if k != "name"
        ):
            return {**r, "recorded": "kept from the results JSON (same settings; not re-run here)"}
    return None


def sweep_trials(bits: int) -> list[dict[str, Any]]:
    """The sweep's results.csv rows (what `python -m revq_ray.tune` wrote), best first."""
    path = ROOT / "runs" / "sweeps" / f"fashion_mnist_{bits}" / "results.csv"
    if not path.is_file():
        return []
    with open(path) as f:
        rows = list(csv.DictReader(f))

    def key(r: dict[str, Any]) -> float:
        try:
            return float(r["val_mse"])
        except (TypeError, ValueError):
            return float("inf")

    # Best validated value first; trials interrupted before their first validation last.
    return sorted(rows, key=key)


def final(args: argparse.Namespace) -> int:
    from revq_ray.runtime import init_ray

    heldout = OUT / "heldout_png"
    if not heldout.is_dir():
        print("error: run `python benchmarks/study_fmnist.py prepare` first", file=sys.stderr)
        return 2
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    init_ray()
    spec = f"taesd:{(args.shared / 'models' / 'taef2').resolve()}"
    wanted = {r for r in args.rows.split(",") if r}
    out: dict[str, Any] = {
        "what": "Fashion-MNIST -> taef2 (64x64, latent 32x8x8) -> tokenizer; metrics on held-out images",
        "commands": [
            "python benchmarks/study_fmnist.py prepare",
            *[f"python -m revq_ray.tune --config tuning/fashion_mnist_{b}.yaml" for b in BUDGETS],
            "python benchmarks/study_fmnist.py final",
        ],
        "heldout_images": len(list(heldout.glob("*.png"))),
        "machine": f"{platform.machine()}, {os.cpu_count()} CPU cores, no GPU",
        "budgets": {},
    }
    budgets = [int(b) for b in args.budgets.split(",") if b] or list(BUDGETS)
    # What this call does not run (rows left out by --rows and not evaluated here, rows not evaluated here
    # with --collect, budgets left out by --budgets) is taken from the results JSON as an earlier `final`
    # recorded it: a row only when its settings are still the config's, a sweep when its results.csv is
    # gone. So the JSON accumulates and is never cut down to the subset one call ran.
    results_json = RESULTS / "study_fmnist.json"
    previous = json.loads(results_json.read_text()) if results_json.is_file() else {}
    for bits in budgets:
        rows = []
        for name, cfg in row_configs(bits).items():
            skipped = bool(wanted) and name not in wanted
            evaluated = (OUT / "eval" / cfg["name"] / "metrics.json").is_file()  # read back, not re-run
            if not evaluated and (skipped or args.collect):
                recorded = _recorded_row(previous, bits, name, cfg)
                if recorded is not None:
                    rows.append(recorded)
                    _log(f"{bits} bits: {name}: kept from {results_json.name} (same settings)")
                elif not skipped:
                    _log(f"{bits} bits: {name}: not evaluated yet, left out (--collect)")
                continue
            _log(f"{bits} bits: {name}")
            rows.append({"row": name, **_train_and_eval(cfg, spec, heldout)})
            _log(f"  {json.dumps(rows[-1]['summary'])[:400]}")
        sweep = sweep_trials(bits)
        if not sweep and previous:
            sweep = previous.get("budgets", {}).get(str(bits), {}).get("sweep", [])
        out["budgets"][str(bits)] = {"rows": rows, "sweep": sweep}
    for key, block in previous.get("budgets", {}).items():  # budgets left out by --budgets: as recorded
        out["budgets"].setdefault(key, block)
    out["budgets"] = {k: out["budgets"][k] for k in sorted(out["budgets"], key=int)}
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "study_fmnist.json").write_text(json.dumps(out, indent=2, default=str))
    plot(out, RESULTS / "study_fmnist.png")
    print(table(out))
    print()
    print(sweep_table(out))
    return 0


def table(res: dict[str, Any]) -> str:
    """The README's table: held-out metrics of every row."""
    lines = [
        "| bits / image | row | T x K | layout, weighting | rectifier | lr (codebook / rectifier) | "
        "PSNR tokenized | PSNR without rectifier | latent MSE without -> with rectifier | SSIM | "
        "held-out usage |",
        "| ---: | --- | --- | --- | --- | --- | ---: | ---: | ---: | ---: | ---: |",
    ]
    for bits, b in res["budgets"].items():
        for r in b["rows"]:
            s = r["summary"]
            lines.append(
                f"| {int(bits):,} | {r['row']} | {r['tokens']} x {r['codebook_size']} | "
                f"{r.get('layout', 'contiguous')}, {r.get('weighting', 'none')} | {r['rectifier']} | "
                f"{r['lr']:.2g} / {r['rectifier_lr']:.2g} | {s['psnr_tokenized']:.2f} dB | "
                f"{s['psnr_tokenized_without_rectifier']:.2f} dB | "
                f"{s['latent_mse_std_without_rectifier']:.4f} -> {s['latent_mse_std_with_rectifier']:.4f} | "
                f"{s['ssim_tokenized']:.3f} | {100 * s['usage_mean']:.1f}% |"
            )
    return "\n".join(lines)


SWEEP_KEYS = {
    "model.quantizer.tokens": "T",
    "model.quantizer.codebook_size": "K",
    "model.rectifier.type": "rect",
    "model.rectifier.width": "W",
    "model.rectifier.depth": "L",
    "train.lr": "lr",
    "train.rectifier_lr_scale": "rect lr x",
    "model.quantizer.loss": "loss",
    "model.quantizer.reset.dead_threshold": "dead <",
    "model.quantizer.reset.ratio": "ratio",
    "model.quantizer.reset.interval": "every",
}


def _fmt(v: Any) -> str:
    try:
        f = float(v)
    except (TypeError, ValueError):
        return str(v)
    return f"{f:.3g}" if f != int(f) else f"{int(f)}"


def sweep_table(res: dict[str, Any], top: int = 5) -> str:
    """The best ``top`` trials of each sweep (held-out-from-training val_mse, the sweep's metric)."""
    cols = list(SWEEP_KEYS.values())
    lines = [
        "| bits | " + " | ".join(cols) + " | val MSE | steps | status |",
        "| ---: | " + " | ".join("---" for _ in cols) + " | ---: | ---: | --- |",
    ]
    for bits, b in res["budgets"].items():
        for r in b["sweep"][:top]:
            cells = [_fmt(r.get(k, "")) for k in SWEEP_KEYS]
            lines.append(
                f"| {int(bits):,} | " + " | ".join(cells) + f" | {_fmt(r.get('val_mse'))} | "
                f"{_fmt(r.get('steps_done'))} | {r.get('status', '')} |"
            )
    return "\n".join(lines)


def plot(res: dict[str, Any], path: Path) -> Path:
    """Per budget: each trial's last val MSE by rectifier type and T (left), held-out PSNR per row (right)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    budgets = list(res["budgets"])
    fig, axes = plt.subplots(len(budgets), 2, figsize=(11, 3.6 * len(budgets)), squeeze=False)
    colors = {"vit": "tab:blue", "cnn": "tab:green", "mlp": "tab:orange"}
    for i, bits in enumerate(budgets):
        b = res["budgets"][bits]
        ax = axes[i][0]
        for r in b["sweep"]:
            try:
                y, t = float(r["val_mse"]), int(float(r["model.quantizer.tokens"]))
            except (TypeError, ValueError, KeyError):
                continue
            done = r.get("status") == "completed"
            ax.scatter(
                t, y, c=colors.get(r.get("model.rectifier.type"), "0.5"), marker="o" if done else "x", s=30
            )
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("tokens T (codebook 2^(bits/T))")
        ax.set_ylabel("val latent MSE (sweep hold-out)")
        ax.set_title(f"{int(bits):,} bits: trials (o = 1,000 steps, x = stopped early)")
        for name, c in colors.items():
            ax.scatter([], [], c=c, label=name)
        ax.legend(fontsize=8)
        ax = axes[i][1]
        names = [r["row"] for r in b["rows"]]
        with_r = [r["summary"]["psnr_tokenized"] for r in b["rows"]]
        without = [r["summary"]["psnr_tokenized_without_rectifier"] for r in b["rows"]]
        x = range(len(names))
        ax.bar([j - 0.2 for j in x], without, 0.4, label="without rectifier", color="0.7")
        ax.bar([j + 0.2 for j in x], with_r, 0.4, label="tokenized", color="tab:blue")
        if b["rows"]:
            vae = b["rows"][0]["summary"]["psnr_vae_only"]
            ax.axhline(vae, color="k", ls="--", lw=1, label=f"VAE only {vae:.2f} dB")
            ax.set_ylim(min(without + with_r) - 2, vae + 1)
        ax.set_xticks(list(x), names, fontsize=8)
        ax.set_ylabel("held-out PSNR (dB)")
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("stage", choices=["prepare", "final"])
    p.add_argument("--shared", type=Path, default=Path(os.environ.get("REVQ_SHARED", ROOT.parent / "shared")))
    p.add_argument("--train-items", type=int, default=10240)
    p.add_argument("--heldout", type=int, default=512)
    p.add_argument("--rows", default="", help="comma-separated subset of rows (default: all)")
    p.add_argument("--budgets", default="", help="comma-separated subset of 2048,5120 (default: both)")
    p.add_argument(
        "--collect", action="store_true", help="final: only gather rows already evaluated (train nothing)"
    )
    args = p.parse_args(argv)
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    os.environ.setdefault("RAY_DATA_DISABLE_PROGRESS_BARS", "1")
    return prepare(args) if args.stage == "prepare" else final(args)


if __name__ == "__main__":
    sys.exit(main())
