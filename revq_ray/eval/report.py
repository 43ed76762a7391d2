"""Figures and the markdown report of an evaluation (matplotlib with the Agg backend: no display needed)."""

from __future__ import annotations

import csv
import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch


def _plt():
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


def save_grid(rows: Sequence[tuple[str, torch.Tensor]], path: str | Path, max_cols: int = 8) -> Path:
    """One row per (label, images (B, 3, H, W) in [0, 1]); the same items in every column."""
    plt = _plt()
    rows = [
        (label, imgs[:max_cols].detach().float().cpu().clamp(0, 1))
        for label, imgs in rows
        if imgs is not None
    ]
    n_cols = min(len(imgs) for _, imgs in rows)
    fig, axes = plt.subplots(
        len(rows),
        n_cols,
        figsize=(1.6 * n_cols + 1.2, 1.7 * len(rows)),
        squeeze=False,
        constrained_layout=True,
    )
    for r, (label, imgs) in enumerate(rows):
        for c in range(n_cols):
            ax = axes[r][c]
            img = imgs[c]
            if img.shape[0] == 1:
                ax.imshow(img[0].numpy(), cmap="gray", vmin=0, vmax=1)
            else:
                ax.imshow(img.permute(1, 2, 0).numpy(), interpolation="nearest")
            ax.set_xticks([])
            ax.set_yticks([])
            if c == 0:
                ax.set_ylabel(label, fontsize=9)
    path = Path(path)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def save_usage(counts_tk: torch.Tensor, path: str | Path, title: str = "") -> Path:
    """Per-group codebook usage (fraction of codes hit) and perplexity / K, plus the code hit histogram."""
    plt = _plt()
    counts = counts_tk.detach().double().cpu()
    t, k = counts.shape
    p = counts / counts.sum(1, keepdim=True).clamp_min(1)
    ent = -(p * torch.log(p.clamp_min(1e-300))).sum(1)
    usage = (counts > 0).double().mean(1).numpy()
    ppl = (ent.exp() / k).numpy()
    fig, (a0, a1) = plt.subplots(1, 2, figsize=(11, 3.6), constrained_layout=True)
    groups = np.arange(t)
    a0.bar(groups, usage * 100, width=1.0, color="tab:blue", alpha=0.6, label="usage (% codes hit)")
    a0.plot(
        groups,
        ppl * 100,
        color="tab:red",
        lw=1.2,
        marker="." if t <= 64 else None,
        label="perplexity / K (%)",
    )
    a0.set_xlabel("group (token position)")
    a0.set_ylabel("%")
    a0.set_ylim(0, 105)
    a0.set_xlim(-0.5, t - 0.5)
    n_items = int(counts[0].sum())
    if 0 < n_items < k:
        # A small evaluation set cannot hit more than n_items of a group's K codes: draw that ceiling.
        a0.axhline(100 * n_items / k, color="k", ls="--", lw=0.8, label=f"ceiling: {n_items} items / K")
    a0.set_title(f"per-group usage: mean {usage.mean() * 100:.1f}%, perplexity/K {ppl.mean() * 100:.1f}%")
    a0.legend(loc="lower right", fontsize=8)
    flat = counts.flatten().numpy()
    top = int(max(flat.max(), 1))
    if top <= 60:  # few hits: one bar per hit count
        a1.hist(flat, bins=np.arange(-0.5, top + 1.5), color="tab:gray")
    else:  # many: log-spaced bins, zero (dead) in its own bin
        edges = np.unique(np.concatenate([[-0.5, 0.5], np.logspace(0, math.log10(top + 1), 30)]))
        a1.hist(flat, bins=edges, color="tab:gray")
        a1.set_xscale("symlog", linthresh=1)
    a1.set_yscale("log")
    dead = int((counts == 0).sum())
    a1.set_title(f"hits per code (all {t} groups x {k} codes): {dead} never used")
    a1.set_xlabel("hits in the evaluation set")
    a1.set_ylabel("codes")
    if title:
        fig.suptitle(title, fontsize=10)
    path = Path(path)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def find_metrics_csv(run_dir: str | Path | None) -> Path | None:
    """The training-metrics CSV of a run directory (the newest ``*.csv`` under it), or None."""
    if run_dir is None:
        return None
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        return None
    preferred = [run_dir / "metrics.csv", run_dir / "logs" / "metrics.csv"]
    for p in preferred:
        if p.is_file():
            return p
    found = sorted(run_dir.rglob("*.csv"), key=lambda p: p.stat().st_mtime)
    found = [p for p in found if "eval" not in p.parts]
    return found[-1] if found else None


def read_csv_columns(path: str | Path) -> dict[str, list[float]]:
    """Numeric columns of a CSV (non-numeric cells become NaN; all-non-numeric columns are dropped)."""
    cols: dict[str, list[float]] = {}
    with open(path, newline="") as f:
        reader = csv.DictReader(f)
        for row in reader:
            for key, val in row.items():
                if key is None:
                    continue
                try:
                    v = float(val) if val not in (None, "") else math.nan
                except ValueError:
                    v = math.nan
                cols.setdefault(key, []).append(v)
    return {k: v for k, v in cols.items() if any(not math.isnan(x) for x in v)}


# Panels of the trainer's metrics.csv (revq_ray.train.logs.COLUMNS); unknown numeric columns get their own
# panel.
CURVE_PANELS: list[tuple[str, tuple[str, ...]]] = [
    ("training loss", ("loss", "loss_quant", "loss_rect")),
    ("validation latent MSE (std units)", ("val_mse", "val_mse_norect")),
    ("codebook usage (fraction of codes hit)", ("usage_mean", "usage_min")),
    ("perplexity (mean over groups)", ("perplexity",)),
    ("dead codes / codes reset", ("dead_codes", "reset_codes")),
    ("learning rate", ("lr", "lr_rectifier")),
]
_CURVE_SKIP = {
    "step",
    "epoch",
    "time_s",
    "time",
    "timestamp",
    "samples_per_s",
    "rank",
    "worker",
    "global_step",
    "training_iteration",
    "iter",
    "grad_norm_codebook",
    "grad_norm_rectifier",
}


def save_curves(csv_path: str | Path, path: str | Path, max_panels: int = 8) -> Path | None:
    """Training curves against the step column from a run's metrics CSV (grouped panels, log-scale losses)."""
    cols = read_csv_columns(csv_path)
    step_key = next((k for k in ("step", "global_step", "training_iteration", "iter") if k in cols), None)
    if not cols or step_key is None:
        return None
    panels = [(title, [k for k in keys if k in cols]) for title, keys in CURVE_PANELS]
    panels = [(t, ks) for t, ks in panels if ks]
    known = {k for _, ks in CURVE_PANELS for k in ks} | _CURVE_SKIP
    panels += [(k, [k]) for k in cols if k not in known and not k.startswith("_")]
    panels = panels[:max_panels]
    if not panels:
        return None
    plt = _plt()
    n = len(panels)
    n_cols = min(3, n)
    n_rows = math.ceil(n / n_cols)
    fig, axes = plt.subplots(
        n_rows, n_cols, figsize=(4.2 * n_cols, 2.8 * n_rows), squeeze=False, constrained_layout=True
    )
    steps = np.asarray(cols[step_key])
    for i, (title, keys) in enumerate(panels):
        ax = axes[i // n_cols][i % n_cols]
        lo, hi = math.inf, -math.inf
        for key in keys:
            y = np.asarray(cols[key])
            ok = ~np.isnan(y) & ~np.isnan(steps)
            if not ok.any():
                continue
            ax.plot(steps[ok], y[ok], marker="." if ok.sum() < 30 else None, lw=1.2, label=key)
            lo, hi = min(lo, float(y[ok].min())), max(hi, float(y[ok].max()))
        if ("loss" in title or "MSE" in title) and lo > 0 and hi / lo > 10:  # log only when it spans a decade
            ax.set_yscale("log")
        ax.set_title(title, fontsize=9)
        ax.set_xlabel(step_key, fontsize=8)
        ax.tick_params(labelsize=7)
        if len(keys) > 1:
            ax.legend(fontsize=7)
    for j in range(n, n_rows * n_cols):
        axes[j // n_cols][j % n_cols].axis("off")
    fig.suptitle(f"training curves ({Path(csv_path).parent.name}/{Path(csv_path).name})", fontsize=10)
    path = Path(path)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def save_mels(rows: Sequence[tuple[str, torch.Tensor]], path: str | Path) -> Path:
    """Mel spectrograms (n_mels, frames) side by side: original, VAE-only, tokenized."""
    plt = _plt()
    rows = [(label, m) for label, m in rows if m is not None]
    fig, axes = plt.subplots(
        len(rows), 1, figsize=(9, 2.2 * len(rows)), squeeze=False, constrained_layout=True
    )
    vmin = min(float(m.min()) for _, m in rows)
    vmax = max(float(m.max()) for _, m in rows)
    for ax, (label, m) in zip(axes[:, 0], rows):
        im = ax.imshow(m.detach().float().cpu().numpy(), origin="lower", aspect="auto", vmin=vmin, vmax=vmax)
        ax.set_ylabel(f"{label}\nmel bin", fontsize=8)
    axes[-1, 0].set_xlabel("frame")
    fig.colorbar(im, ax=axes[:, 0].tolist(), shrink=0.8, label="normalized log-mel")
    path = Path(path)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def format_value(v: Any) -> str:
    """A table cell: floats to 4 significant digits, NaN as ``n/a``."""
    if isinstance(v, float):
        if math.isnan(v):
            return "n/a"
        return f"{v:.4g}"
    return str(v)


def write_report(
    out_dir: str | Path, metrics: dict[str, Any], figures: dict[str, str], notes: Sequence[str]
) -> Path:
    """``report.md`` linking the figures, with the headline metrics as a table."""
    out_dir = Path(out_dir)
    lines = ["# revq-ray evaluation report", ""]
    info = metrics.get("info", {})
    for key in (
        "model",
        "vae",
        "input",
        "items",
        "modality",
        "quantizer",
        "tokens",
        "codebook_size",
        "bits_per_sample",
    ):
        if key in info:
            lines.append(f"- **{key}**: `{info[key]}`")
    lines.append("")
    table = metrics.get("summary", {})
    if table:
        lines += ["| metric | value |", "|---|---|"]
        lines += [f"| {k} | {format_value(v)} |" for k, v in table.items()]
        lines.append("")
    files = metrics.get("files") or []
    if files:  # audio scored whole: one row per file
        cols = [k for k in files[0] if k != "name"]
        lines += ["## per file", "", "| file | " + " | ".join(cols) + " |", "|---" * (len(cols) + 1) + "|"]
        fmt = format_value
        lines += [f"| {f['name']} | " + " | ".join(fmt(f.get(c)) for c in cols) + " |" for f in files]
        lines.append("")
    captions = {
        "grid": "Rows: originals (when the input is media), VAE-only reconstructions, tokenized "
        "reconstructions.",
        "usage": "Per-group codebook usage on the evaluation set and the distribution of hits per code.",
        "curves": "Training curves from the run directory's metrics CSV.",
        "mel": "Mel spectrograms: original, VAE-only, tokenized.",
    }
    for name, rel in figures.items():
        if rel.endswith(".png"):
            lines += [f"## {name}", "", captions.get(name, ""), "", f"![{name}]({rel})", ""]
    audio = {k: v for k, v in figures.items() if v.endswith(".wav")}
    if audio:
        lines += ["## audio", ""] + [f"- [{k}]({v})" for k, v in audio.items()] + [""]
    if notes:
        lines += ["## notes", ""] + [f"- {n}" for n in notes] + [""]
    lines += ["All numbers: [metrics.json](metrics.json).", ""]
    path = out_dir / "report.md"
    path.write_text("\n".join(lines))
    return path


def write_json(path: str | Path, data: dict[str, Any]) -> Path:
    def default(o: Any) -> Any:
        if isinstance(o, torch.Tensor):
            return o.tolist()
        if isinstance(o, np.generic | np.ndarray):
            return o.tolist()
        if isinstance(o, Path):
            return str(o)
        raise TypeError(f"not JSON-serializable: {type(o)}")

    path = Path(path)
    path.write_text(json.dumps(data, indent=2, default=default, allow_nan=True))
    return path
