"""What a finished sweep leaves: ``results.csv`` (one row per trial), ``best.yaml`` (the winner as a complete
training preset), the plots, and a plain-text table."""

from __future__ import annotations

import builtins
import csv
import io
from pathlib import Path
from typing import Any

from revq_ray.config import RunConfig, dump_config, parse_config
from revq_ray.runtime import get_logger, join_location
from revq_ray.tune.config import (
    BITS_METRIC,
    CODEBOOK_KEY,
    PRIOR,
    TOKENS_KEY,
    TuneConfig,
    codebook_size_for,
    pareto_front,
    root_config,
    target_of,
)
from revq_ray.tune.plots import plot_pareto, plot_sweep
from revq_ray.tune.trials import trial_config_data

_log = get_logger("revq_ray.tune")


def write_bytes(location: str, data: bytes) -> None:
    """Write ``data`` at a local path or URI atomically, creating the parent folders."""
    from revq_ray.data import fs as _fs

    fs, path = _fs.resolve(location)
    parent = path.rsplit("/", 1)[0]
    _fs.makedirs(fs, parent)
    _fs.write_bytes_atomic(fs, path, data)


def write_text(location: str, text: str) -> None:
    write_bytes(location, text.encode())


def read_text(location: str) -> str:
    """The text at a local path or URI; ``FileNotFoundError`` when absent."""
    from revq_ray.data import fs as _fs

    fs, path = _fs.resolve(location)
    if not _fs.is_file(fs, path):
        raise FileNotFoundError(location)
    return _fs.read_bytes(fs, path).decode()


def _history(result: Any) -> list[dict[str, Any]]:
    df = getattr(result, "metrics_dataframe", None)
    if df is None or len(df) == 0:
        return [result.metrics] if result.metrics else []
    return df.to_dict("records")


def _progress_done(tcfg: TuneConfig, last: dict[str, Any]) -> float | None:
    value = last.get(tcfg.asha.time_attr)
    return float(value) if isinstance(value, (builtins.int, float)) else None


def trial_rows(tcfg: TuneConfig, grid: Any) -> list[dict[str, Any]]:
    """One row per trial: params, derived codebook size / bits, metrics, status, progress."""
    rows = []
    for result in grid:
        params = dict(result.config or {})
        history = _history(result)
        last = history[-1] if history else {}
        trial_id = (result.metrics or {}).get("trial_id") or Path(result.path).name.removeprefix("trial_")
        row: dict[str, Any] = {"trial_id": trial_id}
        for key in tcfg.space:
            row[key] = params.get(key)
        tokens = params.get(TOKENS_KEY)
        if tcfg.bits_budget is not None and tokens is not None:
            row[CODEBOOK_KEY] = codebook_size_for(tcfg.bits_budget, int(tokens))
        for m in dict.fromkeys([*tcfg.metrics, BITS_METRIC, "usage_mean"]):
            row[m] = last.get(m)
        primary = tcfg.primary_metric
        values = [h[primary] for h in history if isinstance(h.get(primary), (builtins.int, float))]
        pick = min if tcfg.modes[0] == "min" else max
        row[f"best_{primary}"] = pick(values) if values else None
        done = _progress_done(tcfg, last)
        row[f"{tcfg.asha.time_attr}s_done"] = done
        row["steps_done"] = last.get("step")
        row["epochs_done"] = last.get("epoch")
        if result.error is not None:
            status = "error"
        elif tcfg.asha.enabled and done is not None and done < tcfg.asha.max_t:
            status = "stopped_early"
        elif not history:
            status = "no_results"
        else:
            status = "completed"
        row["status"] = status
        row["error"] = "" if result.error is None else str(result.error).splitlines()[0][:200]
        # Reports between validations repeat the last validated value: keep one point per validation.
        curve: list[tuple[Any, Any]] = []
        for h in history:
            if primary in h and (not curve or h[primary] != curve[-1][1]):
                curve.append((h.get(tcfg.asha.time_attr), h[primary]))
        row["history"] = curve
        rows.append(row)
    rows.sort(key=lambda r: str(r["trial_id"]))
    return rows


def write_outputs(tcfg: TuneConfig, grid: Any, base_data: dict[str, Any], sweep_dir: str) -> dict[str, Any]:
    """results.csv, best.yaml, sweep.png (+ pareto.png) from a finished ResultGrid."""
    rows = trial_rows(tcfg, grid)
    primary, mode = tcfg.primary_metric, tcfg.modes[0]
    if len(tcfg.metrics) == 2:
        # Two objectives: flag the non-dominated trials (best.yaml is still the best on the first one).
        m0, m1 = tcfg.metrics
        scored = [r for r in rows if all(isinstance(r.get(m), (builtins.int, float)) for m in (m0, m1))]
        front = {id(scored[i]) for i in pareto_front([(r[m0], r[m1]) for r in scored], tcfg.modes)}
        for r in rows:
            r["pareto_optimal"] = id(r) in front

    # results.csv: one row per trial (the learning curve stays in Tune's per-trial progress.csv).
    columns = [c for c in rows[0] if c != "history"] if rows else ["trial_id"]
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=columns, extrasaction="ignore")
    writer.writeheader()
    for row in rows:
        writer.writerow(row)
    write_text(join_location(sweep_dir, "results.csv"), buf.getvalue())

    # best.yaml: the best trial's full training config, renamed, ready for `python -m revq_ray.train`.
    scored = [r for r in rows if r["status"] != "error" and isinstance(r.get(primary), (builtins.int, float))]
    best = None
    if scored:
        best = (min if mode == "min" else max)(scored, key=lambda r: r[primary])
        params = {k: best[k] for k in tcfg.space}
        data = trial_config_data(
            tcfg,
            base_data,
            params,
            name=f"{tcfg.name}-best",
            output_dir=str(base_data.get("output_dir", RunConfig().output_dir)),
            trial=False,
        )
        target = target_of(base_data)
        cfg = parse_config(data, root_config(target))
        length = f"{tcfg.asha.max_t} {tcfg.asha.time_attr}s" if tcfg.asha.enabled else "the base's length"
        command = "python -m revq_ray.prior" if target == PRIOR else "python -m revq_ray.train"
        header = (
            f"# Best trial of sweep {tcfg.name!r} (base {tcfg.base}): trial {best['trial_id']}, "
            f"{primary}={best[primary]:.6g} after {length}.\n"
            "# The base's resources and length are kept. Train it:\n"
            f"#   {command} --config best.yaml\n"
        )
        write_text(join_location(sweep_dir, "best.yaml"), header + dump_config(cfg))
    else:
        _log.warning("no trial reported the metric; best.yaml not written")

    write_bytes(join_location(sweep_dir, "sweep.png"), plot_sweep(tcfg, rows))
    if len(tcfg.metrics) == 2:
        write_bytes(join_location(sweep_dir, "pareto.png"), plot_pareto(tcfg, rows))
    print(format_table(tcfg, rows), flush=True)
    _log.info("wrote results.csv, best.yaml, sweep.png to %s", sweep_dir)
    return {"sweep_dir": sweep_dir, "rows": rows, "best": best}


def format_table(tcfg: TuneConfig, rows: list[dict[str, Any]]) -> str:
    """A plain-text table of the trials, best first."""
    primary, mode = tcfg.primary_metric, tcfg.modes[0]
    cols = ["trial_id", *tcfg.space]
    if tcfg.bits_budget is not None and TOKENS_KEY in tcfg.space:
        cols.append(CODEBOOK_KEY)
    cols += [
        *dict.fromkeys([*tcfg.metrics, BITS_METRIC, "usage_mean"]),
        f"{tcfg.asha.time_attr}s_done",
        "status",
    ]

    def key(r):
        v = r.get(primary)
        ok = isinstance(v, (builtins.int, float))
        return (not ok, (v if mode == "min" else -v) if ok else 0.0)

    def fmt(v):
        if isinstance(v, float):
            return f"{v:.4g}"
        return "" if v is None else str(v)

    body = [[fmt(r.get(c)) for c in cols] for r in sorted(rows, key=key)]
    headers = [c.split(".")[-1] if "." in c else c for c in cols]
    widths = [max(len(h), *(len(b[i]) for b in body)) if body else len(h) for i, h in enumerate(headers)]
    line = lambda cells: "| " + " | ".join(c.ljust(w) for c, w in zip(cells, widths)) + " |"
    out = [line(headers), "|" + "|".join("-" * (w + 2) for w in widths) + "|", *(line(b) for b in body)]
    return "\n".join(out)
