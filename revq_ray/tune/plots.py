"""The sweep's figures: ``sweep.png`` (metric per trial, learning curves, metric vs each searched key) and,
with two objectives, ``pareto.png``."""

from __future__ import annotations

import builtins
import io
import math
from typing import Any

from revq_ray.tune.config import TuneConfig, pareto_front

STATUS_COLORS = {
    "completed": "tab:blue",
    "stopped_early": "tab:orange",
    "error": "tab:red",
    "no_results": "0.6",
}


def metric_scale(values: list[float]) -> str:
    """The metric axes' scale: "log" once positive values spread over more than 20x, else "linear".

    A few failed configurations can sit 100x above the rest (the 5,120-bit study's T2048 trials) and, on a
    linear axis, flatten every good trial onto zero, which is where the choice between them is made.
    """
    finite = [v for v in values if math.isfinite(v)]
    if finite and min(finite) > 0 and max(finite) > 20 * min(finite):
        return "log"
    return "linear"


def plot_sweep(tcfg: TuneConfig, rows: list[dict[str, Any]]) -> bytes:
    """``sweep.png``: the metric per trial, its learning curves, and the metric against each searched key."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    primary = tcfg.primary_metric
    keys = list(tcfg.space)
    n = 2 + len(keys)
    ncols = min(3, n)
    nrows = math.ceil(n / ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(4.6 * ncols, 3.6 * nrows), squeeze=False)
    flat = axes.ravel()

    ax = flat[0]
    for i, r in enumerate(rows):
        v = r.get(primary)
        if isinstance(v, (builtins.int, float)):
            ax.bar(i, v, color=STATUS_COLORS.get(r["status"], "0.5"))
    ax.set_xticks(range(len(rows)), [str(r["trial_id"]) for r in rows], rotation=60, fontsize=7)
    ax.set_title(f"{primary} per trial (last report)")
    present = [s for s in STATUS_COLORS if any(r["status"] == s for r in rows)]
    handles = [plt.Rectangle((0, 0), 1, 1, color=STATUS_COLORS[s]) for s in present]
    ax.legend(handles, [s.replace("_", " ") for s in present], fontsize=7)

    ax = flat[1]
    for r in rows:
        pts = [(t, v) for t, v in r["history"] if t is not None and v is not None]
        if pts:
            ax.plot(*zip(*pts), marker="o", ms=3, color=STATUS_COLORS.get(r["status"], "0.5"), alpha=0.8)
    ax.set_xlabel(tcfg.asha.time_attr)
    ax.set_title(f"{primary} during training (orange: stopped by ASHA)")

    for ax, key in zip(flat[2:], keys):
        dist = tcfg.space[key]
        xs, ys, cs = [], [], []
        for r in rows:
            v = r.get(primary)
            if r.get(key) is not None and isinstance(v, (builtins.int, float)):
                xs.append(r[key])
                ys.append(v)
                cs.append(STATUS_COLORS.get(r["status"], "0.5"))
        if dist.choice is not None:
            labels = [str(c) for c in dist.choice]
            ax.scatter([labels.index(str(x)) for x in xs], ys, c=cs)
            ax.set_xticks(range(len(labels)), labels, fontsize=8)
        else:
            ax.scatter(xs, ys, c=cs)
            if dist.loguniform is not None:
                ax.set_xscale("log")
                ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
                ax.set_xlim(*dist.loguniform)
            else:
                ax.set_xlim(*(dist.uniform or dist.int_))
        ax.set_xlabel(key)
        ax.set_ylabel(primary)
    values = [r[primary] for r in rows if isinstance(r.get(primary), (builtins.int, float))]
    for ax in flat[:n]:
        ax.set_yscale(metric_scale(values))
    for ax in flat[n:]:
        ax.axis("off")
    fig.suptitle(f"sweep {tcfg.name}: {len(rows)} trials")
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    plt.close(fig)
    return buf.getvalue()


def plot_pareto(tcfg: TuneConfig, rows: list[dict[str, Any]]) -> bytes:
    """``pareto.png``: the two objectives of every trial, with the non-dominated front."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    m0, m1 = tcfg.metrics
    ok = [
        r
        for r in rows
        if isinstance(r.get(m0), (builtins.int, float)) and isinstance(r.get(m1), (builtins.int, float))
    ]
    fig, ax = plt.subplots(figsize=(5.5, 4.2))
    pts = [(r[m1], r[m0]) for r in ok]
    if pts:
        front = pareto_front([(r[m0], r[m1]) for r in ok], tcfg.modes)
        ax.scatter(*zip(*pts), c=[STATUS_COLORS.get(r["status"], "0.5") for r in ok], label="trials")
        fpts = sorted(pts[i] for i in front)
        ax.plot(*zip(*fpts), "k--", marker="s", mfc="none", ms=9, label="Pareto front")
        ax.legend(fontsize=8)
    ax.set_xlabel(m1)
    ax.set_ylabel(m0)
    ax.set_title(f"sweep {tcfg.name}: {m0} vs {m1}")
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    plt.close(fig)
    return buf.getvalue()
