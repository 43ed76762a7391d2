"""ASHA that a resumed sweep does not forget.

Tune restores a sweep's searcher, but its scheduler comes back as it was pickled when the sweep started:
ASHA's rung records (the metric of every trial at every milestone) are empty again, so after a resume the next
trials pass every rung unopposed and a slow, weak trial trains to ``max_t`` (seen in the quality study: a
128-wide ViT at a poor lr ran 1,000 steps after a resume instead of stopping at the first rung).
:class:`ResumableASHA` writes its records to a JSON file in the sweep directory after every decision and
reads them back the first time it is used after a restore.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from ray.tune.schedulers import AsyncHyperBandScheduler

from revq_ray.runtime import get_logger

_log = get_logger("revq_ray.tune")


class ResumableASHA(AsyncHyperBandScheduler):
    """:class:`ray.tune.schedulers.ASHAScheduler` whose rung records survive a resume.

    Args:
        records: JSON file for the records (local path; ``None``: plain ASHA, nothing kept).
        **kwargs: ``ASHAScheduler``'s arguments (time_attr, metric, mode, max_t, grace_period, ...).
    """

    def __init__(self, *, records: str | None = None, **kwargs: Any):
        super().__init__(**kwargs)
        self._records = records
        self._records_loaded = False

    def __getstate__(self) -> dict[str, Any]:
        # Tune pickles the scheduler when the sweep starts; the unpickled one (a resume) must read the file.
        state = self.__dict__.copy()
        state["_records_loaded"] = False
        return state

    # Ray keeps the records in each bracket's ``_rungs``: a list of (milestone, {trial_id: signed metric}).
    def records(self) -> list[dict[str, dict[str, float]]]:
        """The rung records, per bracket: ``{milestone: {trial_id: metric x mode sign}}``."""
        return [{repr(float(m)): dict(rec) for m, rec in b._rungs} for b in self._brackets]

    def _load_records(self) -> None:
        if self._records_loaded or not self._records:
            return
        self._records_loaded = True
        path = Path(self._records)
        if not path.is_file():
            return
        saved = json.loads(path.read_text())
        for bracket, rungs in zip(self._brackets, saved.get("brackets", []), strict=False):
            for milestone, recorded in bracket._rungs:
                for trial_id, value in rungs.get(repr(float(milestone)), {}).items():
                    recorded.setdefault(trial_id, float(value))

    def _save_records(self) -> None:
        if not self._records:
            return
        tmp = f"{self._records}.tmp"
        try:
            Path(tmp).write_text(json.dumps({"brackets": self.records()}))
            os.replace(tmp, self._records)  # a kill mid-write leaves the previous records, never half a file
        except OSError as e:  # e.g. a sweep folder moved since it started: keep tuning, only the file is lost
            if not getattr(self, "_records_warned", False):
                self._records_warned = True
                _log.warning("warning: cannot write ASHA's records to %s: %s", self._records, e)

    def on_trial_add(self, tune_controller: Any, trial: Any) -> None:
        self._load_records()
        super().on_trial_add(tune_controller, trial)

    def on_trial_result(self, tune_controller: Any, trial: Any, result: dict) -> str:
        self._load_records()
        action = super().on_trial_result(tune_controller, trial, result)
        self._save_records()
        return action

    def on_trial_complete(self, tune_controller: Any, trial: Any, result: dict) -> None:
        self._load_records()
        super().on_trial_complete(tune_controller, trial, result)
        self._save_records()
