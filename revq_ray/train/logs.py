"""Rank-0 run logs: ``metrics.csv``, TensorBoard events and a human-readable progress line.

Both files follow the *committed* timeline of the run: when a run resumes from the checkpoint at step s
(a restart after a failure, or a re-run of the same name), rows and events after step s are dropped first,
because those steps are about to be done again. So ``metrics.csv`` of a finished run lists every step
exactly once, however often it was interrupted.
"""

from __future__ import annotations

import csv
import math
import os
import time
from pathlib import Path
from typing import Any

from revq_ray.runtime import get_logger
from revq_ray.train import guards

_log = get_logger("revq_ray.train")

METRICS_FILE = "metrics.csv"
STARTS_FILE = "starts.csv"
STEPS_FILE = "steps.log"

# Fixed columns: a stable schema for CSV readers; anything else reported goes to TensorBoard only.
COLUMNS = [
    "step",
    "epoch",
    "time_s",
    "loss",
    "loss_quant",
    "loss_rect",
    "val_mse",
    "val_mse_norect",
    "usage_mean",
    "usage_min",
    "perplexity",
    "dead_codes",
    "samples_per_s",
    "lr",
    "lr_rectifier",
    "grad_norm_codebook",
    "grad_norm_rectifier",
    "reset_codes",
    "comm_dense_bytes",
    "comm_rows_bytes",
    "comm_rows_received_bytes",
    "rows_touched",
]


def _fmt(v: Any) -> str:
    if v is None:
        return ""
    if isinstance(v, float):
        return repr(v) if math.isfinite(v) else str(v)
    return str(v)


class RunLogger:
    """Writes ``<run_dir>/metrics.csv`` and ``<run_dir>/tensorboard``; only rank 0 creates one."""

    def __init__(self, run_dir: str | os.PathLike, start_step: int, columns: list[str] | None = None):
        self.columns = list(columns or COLUMNS)
        self.run_dir = Path(run_dir)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.csv_path = self.run_dir / METRICS_FILE
        self._truncate_csv(start_step)
        self._tb = None
        try:
            from torch.utils.tensorboard import SummaryWriter

            # purge_step drops events at or after it: the steps after the checkpoint are redone.
            self._tb = SummaryWriter(
                str(self.run_dir / "tensorboard"), purge_step=start_step + 1 if start_step else None
            )
        except Exception as err:  # tensorboard missing or broken: the CSV is the source of truth anyway
            _log.warning("TensorBoard logging off (%s: %s)", type(err).__name__, err)
        with open(self.run_dir / STARTS_FILE, "a", newline="") as f:
            if f.tell() == 0:
                f.write("time,start_step\n")
            f.write(f"{time.time():.3f},{start_step}\n")

    def _truncate_csv(self, start_step: int) -> None:
        rows: list[dict[str, str]] = []
        if self.csv_path.is_file():
            with open(self.csv_path, newline="") as f:
                rows = [r for r in csv.DictReader(f) if r.get("step") and int(r["step"]) <= start_step]
        tmp = self.csv_path.with_suffix(".csv.tmp")
        with open(tmp, "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=self.columns, extrasaction="ignore")
            w.writeheader()
            w.writerows(rows)
        os.replace(tmp, self.csv_path)

    def log(self, metrics: dict[str, Any]) -> None:
        with open(self.csv_path, "a", newline="") as f:
            csv.DictWriter(f, fieldnames=self.columns, extrasaction="ignore").writerow(
                {k: _fmt(metrics.get(k)) for k in self.columns}
            )
        if self._tb is not None:
            step = int(metrics["step"])
            for k, v in metrics.items():
                if (
                    k not in ("step",)
                    and isinstance(v, int | float)
                    and not isinstance(v, bool)
                    and math.isfinite(v)
                ):
                    self._tb.add_scalar(k, v, step)
            self._tb.flush()

    def close(self) -> None:
        if self._tb is not None:
            self._tb.close()


class StepLog:
    """``<run_dir>/steps.log``: append-only, never rewritten (unlike ``metrics.csv``). Each start of the
    worker group writes ``start <step> pid <pid>``, then rank 0 writes every optimizer step it completes, one
    line each, flushed at once. After failures it shows what was really executed: steps rolled back to a
    checkpoint appear twice, once in each attempt; :func:`committed_steps` gives the timeline that counts."""

    def __init__(self, run_dir: str | os.PathLike, start_step: int):
        self.path = Path(run_dir) / STEPS_FILE
        self._f = open(self.path, "a", buffering=1)  # noqa: SIM115 - line-buffered for the run's lifetime
        self._f.write(f"start {start_step} pid {os.getpid()}\n")

    def step(self, step: int) -> None:
        self._f.write(f"{step}\n")

    def close(self) -> None:
        self._f.close()


def read_step_log(path: str | os.PathLike) -> list[tuple[int, list[int]]]:
    """``[(start_step, [steps done by that attempt]), ...]`` from a ``steps.log``."""
    attempts: list[tuple[int, list[int]]] = []
    for line in Path(path).read_text().splitlines():
        if line.startswith("start "):
            attempts.append((int(line.split()[1]), []))
        elif line.strip() and attempts:
            attempts[-1][1].append(int(line))
    return attempts


def committed_steps(attempts: list[tuple[int, list[int]]]) -> list[int]:
    """The steps that count: each attempt's steps up to where the next attempt resumed."""
    out: list[int] = []
    for i, (_, steps) in enumerate(attempts):
        stop = attempts[i + 1][0] if i + 1 < len(attempts) else None
        out.extend(s for s in steps if stop is None or s <= stop)
    return out


def _duration(seconds: float) -> str:
    seconds = max(0, int(seconds))
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h}h{m:02d}m" if h else f"{m}m{s:02d}s"


def progress_line(m: dict[str, Any], total_steps: int, eta_s: float | None) -> str:
    """One line per report, e.g.
    ``step 120/1000 (12%) ep 2.40 | loss 0.1234 (quant 0.0512 rect 0.0722) | val 0.0701 (norect 0.0733) |
    usage 97.5% (min 90.1%) ppl 812 dead 3 | lr 9.1e-04 | 5,432 samples/s | eta 3m12s``."""
    parts = [
        f"step {m['step']}/{total_steps} ({100 * m['step'] / max(total_steps, 1):.0f}%) ep {m['epoch']:.2f}"
    ]
    if "loss" in m:
        parts.append(
            f"loss {m['loss']:.4f} (quant {m.get('loss_quant', math.nan):.4f} "
            f"rect {m.get('loss_rect', math.nan):.4f})"
        )
    if "val_mse" in m:
        parts.append(f"val {m['val_mse']:.4f} (norect {m.get('val_mse_norect', float('nan')):.4f})")
    if "usage_mean" in m:
        parts.append(
            f"usage {100 * m['usage_mean']:.1f}% (min {100 * m['usage_min']:.1f}%) ppl {m['perplexity']:.0f} "
            f"dead {m['dead_codes']:.0f}"
        )
    if m.get("reset_codes"):
        parts.append(f"reset {m['reset_codes']:.0f} codes")
    if "lr" in m:
        parts.append(f"lr {m['lr']:.1e}")
    if "samples_per_s" in m:
        parts.append(f"{m['samples_per_s']:,.0f} samples/s")
    if eta_s is not None:
        parts.append(f"eta {_duration(eta_s)}")
    return " | ".join(parts)


# --------------------------------------------------------------------------------------------- reporter
class Reporter:
    """Window sums, the metrics dict, ``ray.train.report`` and rank 0's logs, for the worker loop (saving and
    exporting: :class:`~revq_ray.train.checkpoint.Checkpointer`).

    Per step, :meth:`add` adds the step's losses to sums that stay on the device (no host sync). When the
    schedule says a report is due, :meth:`close_window` all-reduces the sums (one small collective, on every
    rank) and checks them: a non-finite loss stops the run with its step number, before anything is saved.
    :meth:`publish` then writes the CSV row, the TensorBoard events and the progress line (rank 0) and
    reports to Ray Train (every rank, with its checkpoint part when one was saved).

    Ray Train V2 takes one report per worker every health-check interval (a queue of size 1, drained every
    ``RAY_TRAIN_HEALTH_CHECK_INTERVAL_S`` = 2 s by default): reporting more often blocks the loop. So every
    log step goes to the CSV, TensorBoard and the progress line, but to ``ray.train.report`` only when this
    long has passed since the last report; checkpoints, validations and the last step are always reported.
    """

    report_interval_s = float(os.environ.get("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "2.0"))
    columns = COLUMNS  # metrics.csv's columns (a subclass for another model names its own)

    def __init__(self, *, run_dir: Path, rank: int, samples_per_step: int, total_steps: int,
                 steps_per_epoch: int, start_step: int, device: Any, reduce_floats: Any,
                 run_location: str | None = None):  # fmt: skip
        import torch

        self.run_dir, self.rank = Path(run_dir), rank
        # what the metrics call the run folder: the URI it is mirrored to, else the local folder
        self.run_location = run_location or str(self.run_dir)
        self.samples_per_step, self.total, self.spe = samples_per_step, total_steps, steps_per_epoch
        self.start_step = start_step
        self.reduce_floats = reduce_floats  # list[float] -> list[float], summed over ranks
        self.logger = RunLogger(self.run_dir, start_step, self.columns) if rank == 0 else None
        self.steplog = StepLog(self.run_dir, start_step) if rank == 0 else None
        self.win = torch.zeros(3, dtype=torch.float64, device=device)  # loss, quant part, rect
        self.extra: dict[str, Any] = {}
        self.win_steps = 0
        self.reset_codes = 0
        self.run_t0 = self.win_t0 = time.perf_counter()
        self.last_report_t = 0.0

    def add(self, step: int, losses: dict[str, Any], loss: Any) -> None:
        """Step ``step`` is done: its losses (device tensors; nothing leaves the device), and rank 0's line in
        the append-only ``steps.log``."""
        import torch

        if self.steplog is not None:
            self.steplog.step(step)
        with torch.no_grad():
            total, rect = loss.detach().double(), losses["rect"].detach().double()
            self.win += torch.stack([total, total - rect, rect])
            for k, v in losses.items():
                if k not in ("quant", "rect"):
                    self.extra[k] = self.extra.get(k, 0.0) + v.detach().double()
        self.win_steps += 1

    def close_window(self, step: int) -> tuple[dict[str, float], bool]:
        """Collective: the window's mean losses over all ranks, and whether Ray wants a report now (rank 0's
        clock decides; riding on this all-reduce keeps every rank's report count equal). Raises
        :class:`~revq_ray.train.guards.NonFiniteError` on a NaN/Inf loss (on every rank alike)."""
        want = float(self.rank == 0 and time.perf_counter() - self.last_report_t >= self.report_interval_s)
        extra_keys = sorted(self.extra)
        local = [*self.win.tolist(), *(float(self.extra[k]) for k in extra_keys), float(self.win_steps), want]
        sums = self.reduce_floats(local)
        n = max(sums[-2], 1.0)
        means = {"loss": sums[0] / n, "loss_quant": sums[1] / n, "loss_rect": sums[2] / n}
        means.update({f"loss_{k}": sums[3 + i] / n for i, k in enumerate(extra_keys)})
        guards.check_window(sums[0], sums[-2], step, first_step=step - self.win_steps + 1)
        return means, sums[-1] > 0

    def metrics(self, state: Any, means: dict[str, float], **extra: Any) -> dict[str, Any]:
        """The metrics dict of this report (``extra``: lr, norms, usage, validation, ...)."""
        elapsed = max(time.perf_counter() - self.win_t0, 1e-9)
        m: dict[str, Any] = {
            "step": state.step,
            "epoch": state.epoch + state.step_in_epoch / self.spe,
            "time_s": round(time.perf_counter() - self.run_t0, 3),
            **means,
            "samples_per_s": self.win_steps * self.samples_per_step / elapsed,
            "reset_codes": self.reset_codes,
            "run_dir": self.run_location,
        }
        m.update({k: v for k, v in extra.items() if v is not None})
        return m

    def publish(self, metrics: dict[str, Any], *, due_ray: bool, checkpoint: Any = None) -> None:
        """Rank 0: CSV/TensorBoard, progress line. Every rank: ``ray.train.report`` if due or with
        ``checkpoint`` (this rank's part, from :meth:`revq_ray.train.checkpoint.Checkpointer.save`: the one
        report call that Ray Train uploads it in)."""
        import ray.train

        from revq_ray.train import checkpoint as ckpt

        if self.rank == 0 and self.logger is not None:
            self.logger.log(metrics)
            rate = metrics["step"] - self.start_step
            eta = (
                (self.total - metrics["step"]) * (time.perf_counter() - self.run_t0) / rate if rate else None
            )
            _log.info(self.progress_line(metrics, eta))
        if due_ray or checkpoint is not None:
            ray.train.report(
                metrics,
                checkpoint=checkpoint,
                checkpoint_dir_name=ckpt.dir_name(metrics["step"]) if checkpoint else None,
            )
            self.last_report_t = time.perf_counter()
        self.win.zero_()
        self.extra, self.win_steps, self.reset_codes = {}, 0, 0
        self.win_t0 = time.perf_counter()

    def progress_line(self, metrics: dict[str, Any], eta_s: float | None) -> str:
        """The line logged for each report (:func:`progress_line`)."""
        return progress_line(metrics, self.total, eta_s)

    def close(self) -> None:
        if self.logger is not None:
            self.logger.close()
        if self.steplog is not None:
            self.steplog.close()
