"""Compare quantizers on the same latents at the same bits per sample: ReVQ vs SimVQ vs GQ vs plain VQ, plus
ReVQ ablations (no reset, no rectifier). Every row is trained by the same builder (:mod:`revq_ray.train`,
Ray Train + DeepSpeed) from one base config, on the same shards, for the same number of steps.

    revq-ray compare --shards runs/quickstart/latents/train --bits 1024 --steps 300 --output runs/compare

Bits per sample ``B = T * log2(K)``: with ``--tokens T`` (default: the base config's, if it divides the latent
size) the codebook size is ``K = 2 ** (B / T)`` (rounded to an integer; the table reports the exact bits).

Writes ``<output>/compare.csv``, ``compare.md`` (also printed), ``compare.json`` and ``compare.png``; the runs
live in ``<output>/runs/<row>-T<tokens>-K<codes>-s<steps>`` (re-running the same command resumes them).
"""

from __future__ import annotations

import argparse
import copy
import csv
import json
import math
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from revq_ray.runtime import add_set_argument, get_logger, set_dotted

_log = get_logger("revq_ray.compare").info

# Each row: name -> (description, config overrides on model.quantizer / model.rectifier)
ROWS: dict[str, tuple[str, dict[str, Any]]] = {
    "revq": ("ReVQ: grouped VQ + non-activation reset + rectifier", {"quantizer.type": "revq"}),
    "simvq": ("SimVQ: frozen codebook + learned linear map, same rectifier", {"quantizer.type": "simvq"}),
    "gq": ("GQ: Gaussian prior-sample codebook, posterior scoring, same rectifier", {"quantizer.type": "gq"}),
    "vq": (
        "plain VQ: no reset, no rectifier",
        {"quantizer.type": "vq", "quantizer.reset.enabled": False, "rectifier.type": "identity"},
    ),
    "revq_no_reset": (
        "ReVQ without reset (ablation)",
        {"quantizer.type": "revq", "quantizer.reset.enabled": False},
    ),
    "revq_no_rectifier": (
        "ReVQ without rectifier (ablation)",
        {"quantizer.type": "revq", "rectifier.type": "identity"},
    ),
}

# The base when no --config is given: a small CPU preset derived from configs/debug.yaml (embedded so the
# command works from an installed package, where configs/ is not present).
DEFAULT_BASE: dict[str, Any] = {
    "name": "compare",
    "seed": 0,
    "data": {"val_items": 256, "shuffle_buffer": 512, "prefetch_batches": 1},
    "model": {
        "quantizer": {
            "type": "revq",
            "tokens": 64,
            "codebook_size": 256,
            "init": "sample",
            "reset": {"enabled": True, "unit": "steps", "interval": 50},
        },
        "rectifier": {"type": "vit", "width": 64, "depth": 1, "head_dim": 16},
    },
    "train": {
        "num_workers": 1,
        "use_gpu": False,
        "cpus_per_worker": 1,
        "torch_threads": 1,
        "zero_stage": 0,
        "precision": "fp32",
        "batch_size": 64,
        "epochs": 1000,
        "lr": 0.01,
        "log_every": 25,
        "keep_checkpoints": 1,
        "max_failures": 0,
    },
}


@dataclass
class Row:
    name: str
    description: str
    quantizer: str
    rectifier: str
    reset: bool
    tokens: int
    codebook_size: int
    bits_per_sample: float
    status: str = "ok"  # ok | skipped | failed
    val_mse: float = math.nan
    val_mse_norect: float = math.nan
    usage: float = math.nan
    perplexity_over_k: float = math.nan
    dead_codes: float = math.nan
    steps: int = 0
    train_s: float = math.nan
    run_dir: str = ""
    note: str = ""
    extra: dict[str, Any] = field(default_factory=dict)


def codebook_size_for(bits: float, tokens: int) -> int:
    """``K = 2 ** (bits / tokens)`` rounded to an integer >= 2; raises when that is out of reach."""
    if bits <= 0 or tokens <= 0:
        raise ValueError(f"--bits={bits} and --tokens={tokens} must be positive")
    k = round(2.0 ** (bits / tokens))
    if k < 2:
        raise ValueError(
            f"--bits={bits} over {tokens} tokens is {bits / tokens:.3g} bits per token (< 1): "
            "raise --bits or lower --tokens"
        )
    if k > 2**22:
        raise ValueError(
            f"--bits={bits} over {tokens} tokens needs K = 2^{bits / tokens:.1f} codes per group: "
            "raise --tokens"
        )
    return k


def run_name(row: str, tokens: int, k: int, steps: int) -> str:
    return f"{row}-T{tokens}-K{k}-s{steps}"


def row_config(
    base: dict[str, Any],
    row: str,
    *,
    shards: str,
    val_shards: str,
    tokens: int,
    k: int,
    steps: int,
    output: Path,
) -> dict[str, Any]:
    """The full config dict of one comparison row (validated by the caller)."""
    cfg = copy.deepcopy(base)
    # The settings are in the run name: Ray Train resumes a run by name, and a re-run with other bits or
    # steps must start fresh rather than resume a run of another shape.
    cfg["name"] = run_name(row, tokens, k, steps)
    cfg["output_dir"] = str(output / "runs")
    set_dotted(cfg, "data.shards", shards)
    set_dotted(cfg, "data.val_shards", val_shards)
    set_dotted(cfg, "model.quantizer.tokens", tokens)
    set_dotted(cfg, "model.quantizer.codebook_size", k)
    set_dotted(cfg, "train.max_steps", steps)
    cfg.setdefault("train", {}).setdefault("epochs", 1000)
    cfg["train"]["epochs"] = max(int(cfg["train"]["epochs"]), 1000)  # max_steps decides, not epochs
    for key, value in ROWS[row][1].items():
        set_dotted(cfg, f"model.{key}", value)
    if row == "gq" and cfg.get("model", {}).get("weighting", "none") != "none":
        # GQ scores codes in the VAE's raw units against its prior: the decoder weighting does not apply (the
        # layout does); its val_mse is then in plain standardized units, which the table's note says
        set_dotted(cfg, "model.weighting", "none")
    return cfg


def _metric(m: dict[str, Any], *names: str) -> float:
    for n in names:
        v = m.get(n)
        if isinstance(v, int | float) and not isinstance(v, bool):
            return float(v)
    return math.nan


@dataclass
class _Plan:
    """What every row of one comparison shares: the data, the base config and the rate."""

    manifest: Any
    base: dict[str, Any]
    tokens: int
    k: int
    actual_bits: float
    names: list[str]


def _plan_compare(
    shards: str,
    bits: float,
    tokens: int | None,
    val_shards: str,
    base: dict[str, Any] | None,
    rows: Sequence[str] | None,
    overrides: Sequence[str],
) -> _Plan:
    """Read the manifest, pick T (the base's, else the largest valid one with d >= 4) and K for ``bits``."""
    from revq_ray.config import apply_overrides
    from revq_ray.core.layout import TokenLayout, valid_token_counts
    from revq_ray.data.shards import read_manifest

    manifest = read_manifest(shards)
    base = apply_overrides(copy.deepcopy(base or DEFAULT_BASE), list(overrides))
    numel = math.prod(manifest.latent_shape)
    if tokens is None:
        tokens = int(base.get("model", {}).get("quantizer", {}).get("tokens", 0) or 0)
        if not tokens or numel % tokens:
            # the largest valid T with d >= 4 (ReVQ's 512T setting has d = 4)
            tokens = max([t for t in valid_token_counts(numel) if numel // t >= 4] or [1])
    TokenLayout(manifest.latent_shape, tokens)  # clear error naming --tokens and the valid choices
    k = codebook_size_for(bits, tokens)
    if not val_shards:
        # hold out a slice of the shards; never more than an eighth of a small set
        base.setdefault("data", {})
        base["data"]["val_items"] = max(1, min(int(base["data"].get("val_items", 256)), manifest.count // 8))
    names = list(rows or ROWS)
    unknown = [r for r in names if r not in ROWS]
    if unknown:
        raise ValueError(f"--rows {unknown}: unknown; choose from {list(ROWS)}")
    return _Plan(manifest, base, tokens, k, tokens * math.log2(k), names)


def _fill_metrics(row: Row, m: dict[str, Any], k: int, rectifier: str) -> None:
    """Copy the last report of a row's training run into its table row."""
    row.val_mse = _metric(m, "val_mse")
    row.val_mse_norect = _metric(m, "val_mse_norect")
    row.usage = _metric(m, "usage_mean")
    row.perplexity_over_k = _metric(m, "perplexity") / k
    row.dead_codes = _metric(m, "dead_codes")
    row.steps = int(_metric(m, "step")) if math.isfinite(_metric(m, "step")) else 0
    row.run_dir = str(m.get("run_dir") or row.run_dir)
    if m.get("val_source") == "train":
        row.note = "no validation split: val_mse is the training loss"
    if rectifier == "identity" and math.isnan(row.val_mse_norect):
        row.val_mse_norect = row.val_mse


def _run_row(
    name: str,
    plan: _Plan,
    *,
    shards: str,
    val_shards: str,
    steps: int,
    output: Path,
    log: Callable[[str], None],
    where: str,
) -> Row:
    """Train one row, or skip it when its method cannot run on these shards; a failed run is a row too."""
    from revq_ray.config import ConfigError, parse_config
    from revq_ray.train import run as train_run

    cfg_dict = row_config(
        plan.base, name, shards=shards, val_shards=val_shards, tokens=plan.tokens, k=plan.k, steps=steps,
        output=output,
    )  # fmt: skip
    try:
        cfg = parse_config(cfg_dict)
    except ConfigError as err:
        raise ConfigError(f"compare row {name!r}: {err}") from None
    q, r = cfg.model.quantizer, cfg.model.rectifier
    row = Row(
        name=name,
        description=ROWS[name][0],
        quantizer=q.type,
        rectifier=r.type,
        reset=bool(q.reset.enabled) and q.type in ("revq", "vq"),
        tokens=plan.tokens,
        codebook_size=plan.k,
        bits_per_sample=plan.actual_bits,
        run_dir=str(output / "runs" / cfg.name),
    )
    if q.type == "gq" and not plan.manifest.has_logvar:
        row.status = "skipped"
        row.note = (
            "GQ needs posterior log-variances: these shards hold latents only "
            "(encode with a Gaussian VAE and --logvar to include GQ)"
        )
        log(f"{where} {name}: skipped - {row.note}")
        return row
    log(f"{where} {name}: {row.description}")
    t0 = time.perf_counter()
    try:
        result = train_run(cfg)
        m = dict(result.metrics or {})
        if getattr(result, "error", None):
            raise RuntimeError(str(result.error))
    except Exception as err:  # keep going: one failing method must not hide the others
        row.status = "failed"
        row.note = f"{type(err).__name__}: {str(err).splitlines()[0][:300] if str(err) else ''}"
        log(f"{name} failed: {row.note}")
        return row
    row.train_s = round(time.perf_counter() - t0, 1)
    _fill_metrics(row, m, plan.k, r.type)
    log(
        f"{name}: val_mse {row.val_mse:.4f} (without rectifier {row.val_mse_norect:.4f}), "
        f"usage {100 * row.usage:.1f}%, {row.train_s:.0f}s"
    )
    return row


def compare(
    shards: str,
    bits: float,
    *,
    steps: int = 300,
    output: str | Path = "runs/compare",
    tokens: int | None = None,
    val_shards: str = "",
    base: dict[str, Any] | None = None,
    rows: Sequence[str] | None = None,
    overrides: Sequence[str] = (),
    log: Callable[[str], None] | None = None,
) -> list[Row]:
    """Train every row of :data:`ROWS` (or ``rows``) on ``shards`` at ``bits`` bits per sample.

    Returns the table. A row that cannot run on this data (GQ without log-variances) is kept with
    ``status="skipped"`` and a note; a row whose training fails is kept with ``status="failed"`` and the
    error, so one bad method never hides the others. ``log`` gets progress lines (default: the
    ``revq_ray.compare`` logger).
    """
    log = log or _log
    output = Path(output).expanduser().resolve()
    output.mkdir(parents=True, exist_ok=True)
    plan = _plan_compare(shards, bits, tokens, val_shards, base, rows, overrides)
    log(
        f"{plan.manifest.count} latents {plan.manifest.latent_shape} from {shards}: "
        f"T={plan.tokens} tokens x K={plan.k} codes = {plan.actual_bits:g} bits/sample (asked {bits:g}); "
        f"{steps} steps per row; rows: {', '.join(plan.names)}"
    )
    table = [
        _run_row(
            name,
            plan,
            shards=shards,
            val_shards=val_shards,
            steps=steps,
            output=output,
            log=log,
            where=f"({i}/{len(plan.names)})",
        )  # fmt: skip
        for i, name in enumerate(plan.names, 1)
    ]
    meta = {"shards": shards, "bits_asked": bits, "steps": steps, "latent_shape": plan.manifest.latent_shape}
    write_outputs(table, output, meta=meta)
    return table


# --------------------------------------------------------------------------------------------- outputs
COLUMNS = [
    ("name", "row"),
    ("quantizer", "quantizer"),
    ("rectifier", "rectifier"),
    ("reset", "reset"),
    ("tokens", "T"),
    ("codebook_size", "K"),
    ("bits_per_sample", "bits"),
    ("val_mse", "val MSE"),
    ("val_mse_norect", "val MSE w/o rect"),
    ("usage", "usage"),
    ("perplexity_over_k", "ppl/K"),
    ("steps", "steps"),
    ("train_s", "train s"),
    ("status", "status"),
    ("note", "note"),
]


def _cell(key: str, v: Any) -> str:
    if isinstance(v, float):
        if math.isnan(v):
            return "-"
        if key in ("usage", "perplexity_over_k"):
            return f"{100 * v:.1f}%"
        if key in ("bits_per_sample", "train_s"):
            return f"{v:g}"
        return f"{v:.4f}"
    if isinstance(v, bool):
        return "yes" if v else "no"
    return str(v)


def markdown_table(table: Sequence[Row]) -> str:
    head = "| " + " | ".join(h for _, h in COLUMNS) + " |"
    sep = "|" + "|".join("---" for _ in COLUMNS) + "|"
    lines = [head, sep]
    for row in table:
        d = asdict(row)
        lines.append("| " + " | ".join(_cell(k, d[k]).replace("|", "/") for k, _ in COLUMNS) + " |")
    return "\n".join(lines)


def save_plot(table: Sequence[Row], path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt
    import numpy as np

    names = [r.name for r in table]
    x = np.arange(len(table))
    fig, (a0, a1) = plt.subplots(1, 2, figsize=(12, 4), constrained_layout=True)
    with_rect = [r.val_mse for r in table]
    no_rect = [r.val_mse_norect for r in table]
    a0.bar(x - 0.2, no_rect, 0.4, label="without rectifier", color="tab:gray")
    a0.bar(x + 0.2, with_rect, 0.4, label="with rectifier (final)", color="tab:blue")
    for xi, r in zip(x, table):
        if r.status != "ok":
            a0.text(xi, 0, r.status, ha="center", va="bottom", rotation=90, fontsize=9, color="tab:red")
    a0.set_xticks(x, names, rotation=25, ha="right")
    a0.set_ylabel("validation latent MSE (standardized units)")
    bits = table[0].bits_per_sample if table else math.nan
    a0.set_title(f"reconstruction at {bits:g} bits/sample (lower is better)")
    a0.legend(fontsize=8)
    a1.bar(
        x, [100 * r.usage if math.isfinite(r.usage) else 0 for r in table], color="tab:green", label="usage"
    )
    a1.plot(
        x,
        [100 * r.perplexity_over_k if math.isfinite(r.perplexity_over_k) else np.nan for r in table],
        "o",
        color="tab:red",
        label="perplexity / K",
    )
    a1.set_xticks(x, names, rotation=25, ha="right")
    a1.set_ylim(0, 105)
    a1.set_ylabel("%")
    a1.set_title("codebook usage at the end of training")
    a1.legend(fontsize=8)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def write_outputs(table: Sequence[Row], output: Path, meta: dict[str, Any]) -> dict[str, Path]:
    output.mkdir(parents=True, exist_ok=True)
    paths = {
        "csv": output / "compare.csv",
        "md": output / "compare.md",
        "json": output / "compare.json",
        "png": output / "compare.png",
    }
    keys = [k for k in asdict(table[0]) if k != "extra"] if table else []
    with open(paths["csv"], "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=keys, extrasaction="ignore")
        w.writeheader()
        for r in table:
            w.writerow(asdict(r))
    md = markdown_table(table)
    paths["md"].write_text(
        f"# revq-ray compare\n\nshards `{meta.get('shards')}`, {meta.get('steps')} steps per row, latent "
        f"{meta.get('latent_shape')}\n\n{md}\n\nval MSE: per-element standardized latent MSE on the held-out "
        "latents (the trainer's validation), with the rectifier (the model's output) and without it.\n\n"
        "![compare](compare.png)\n"
    )
    paths["json"].write_text(
        json.dumps({"meta": meta, "rows": [asdict(r) for r in table]}, indent=2, default=str)
    )
    if table:
        save_plot(table, paths["png"])
    return paths


# --------------------------------------------------------------------------------------------- CLI
def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="revq-ray compare",
        description="Train ReVQ, SimVQ, GQ, plain VQ and ReVQ ablations on the same latents at the same bits "
        "per sample, and tabulate them (compare.csv/.md/.png).",
    )
    p.add_argument(
        "--shards", required=True, help="latent shard directory (manifest.json), from revq-ray encode"
    )
    p.add_argument("--bits", type=float, required=True, help="bits per sample B = T * log2(K)")
    p.add_argument("--steps", type=int, default=300, help="optimizer steps per row (default 300)")
    p.add_argument("--output", default="runs/compare", help="output directory (default runs/compare)")
    p.add_argument("--tokens", type=int, default=None, help="T tokens per latent (default: base config's)")
    p.add_argument("--val-shards", default="", help="separate validation shards (default: a held-out slice)")
    p.add_argument(
        "--config", default=None, help="base run preset YAML (default: a built-in small CPU preset)"
    )
    p.add_argument("--rows", default=None, help=f"comma-separated subset of rows: {','.join(ROWS)}")
    add_set_argument(p, help="override a base-config value for every row, e.g. --set train.lr=0.005")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    from revq_ray.config import ConfigError, load_yaml

    args = build_parser().parse_args(argv)
    try:
        base = load_yaml(args.config) if args.config else None
        table = compare(
            args.shards,
            args.bits,
            steps=args.steps,
            output=args.output,
            tokens=args.tokens,
            val_shards=args.val_shards,
            base=base,
            rows=args.rows.split(",") if args.rows else None,
            overrides=args.overrides,
        )
    except (ConfigError, FileNotFoundError, ValueError) as err:
        print(f"revq-ray compare: error: {err}", file=sys.stderr)
        return 2
    print()
    print(markdown_table(table))
    print(f"\nwrote {Path(args.output) / 'compare.csv'}, compare.md and compare.png")
    return 0 if any(r.status == "ok" for r in table) else 1


if __name__ == "__main__":
    sys.exit(main())
