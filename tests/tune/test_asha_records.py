"""ASHA's rung records survive a resumed sweep (revq_ray.tune.asha.ResumableASHA; Ray's real scheduler code,
no Ray cluster needed): Tune restores the scheduler as it was pickled when the sweep started."""

from __future__ import annotations

import json
import pickle

import pytest

pytestmark = pytest.mark.tune

ASHA = dict(time_attr="step", metric="val_mse", mode="min", max_t=1000, grace_period=125, reduction_factor=3)


def _trial(trial_id: str):
    from ray.tune.experiment import Trial

    return Trial("revq", trial_id=trial_id, stub=True)


def _result(scheduler, trial, step: int, val: float) -> str:
    return scheduler.on_trial_result(None, trial, {"step": step, "val_mse": val})


def test_a_resumed_sweep_still_stops_weak_trials(tmp_path):
    from ray.tune.schedulers import TrialScheduler

    from revq_ray.tune.asha import ResumableASHA

    records = tmp_path / "asha_records.json"
    first = ResumableASHA(records=str(records), **ASHA)
    started = pickle.dumps(first)  # what Tune keeps: the scheduler as the sweep started, no records yet
    for i, val in enumerate([0.1, 0.2, 0.3, 0.4]):
        t = _trial(f"t{i}")
        first.on_trial_add(None, t)
        _result(first, t, 125, val)
    saved = json.loads(records.read_text())["brackets"][0]
    assert saved[repr(125.0)] == {"t0": -0.1, "t1": -0.2, "t2": -0.3, "t3": -0.4}  # signed: higher is better

    resumed = pickle.loads(started)
    weak = _trial("weak")
    resumed.on_trial_add(None, weak)
    assert _result(resumed, weak, 125, 0.9) == TrialScheduler.STOP
    strong = _trial("strong")
    resumed.on_trial_add(None, strong)
    assert _result(resumed, strong, 125, 0.05) == TrialScheduler.CONTINUE
    assert set(json.loads(records.read_text())["brackets"][0][repr(125.0)]) == {
        "t0", "t1", "t2", "t3", "weak", "strong"
    }  # fmt: skip

    # Without the records file (what Ray's ASHAScheduler does), the same weak trial passes the rung unopposed.
    forgetful = pickle.loads(pickle.dumps(ResumableASHA(records=None, **ASHA)))
    weak2 = _trial("weak")
    forgetful.on_trial_add(None, weak2)
    assert _result(forgetful, weak2, 125, 0.9) == TrialScheduler.CONTINUE


def test_an_unwritable_records_file_does_not_stop_the_sweep(tmp_path):
    from ray.tune.schedulers import TrialScheduler

    from revq_ray.tune.asha import ResumableASHA

    moved = ResumableASHA(records=str(tmp_path / "gone" / "asha_records.json"), **ASHA)  # folder moved away
    t = _trial("t0")
    moved.on_trial_add(None, t)
    assert _result(moved, t, 125, 0.1) == TrialScheduler.CONTINUE
    assert not (tmp_path / "gone").exists()
