"""A sweep over the prior through the same Ray Tune machinery as the tokenizer's (tuning/prior_debug.yaml:
2 tiny trials of `python -m revq_ray.prior`, real Ray Tune + Ray Train + DeepSpeed on CPU): results.csv ranks
them on val_loss and best.yaml is a prior preset that loads as is."""

from __future__ import annotations

import csv
from pathlib import Path

import pytest

from .conftest import patterned_ids, write_token_dir

# Two Train runs through Tune: about two minutes on a busy 2-core machine, so outside the default run.
pytestmark = [pytest.mark.tune, pytest.mark.slow, pytest.mark.extended, pytest.mark.timeout(1800)]

ROOT = Path(__file__).resolve().parents[2]


def test_prior_sweep_ranks_trials_and_writes_a_prior_preset(ray_local, tmp_path, monkeypatch):
    from revq_ray.prior.config import load_prior_config
    from revq_ray.tune import load_tune_config, run_sweep

    ids, labels = patterned_ids(96, 8, 6, 3)
    tokens = write_token_dir(tmp_path / "tokens", ids, codebook_size=6, labels=labels)
    monkeypatch.chdir(ROOT)
    tcfg = load_tune_config(
        ROOT / "tuning" / "prior_debug.yaml",
        [f"output_dir={tmp_path}"],
        train_overrides=[f"data.tokens={tokens}"],
    )
    out = run_sweep(tcfg, verbose=0)
    sweep = Path(out["sweep_dir"])
    with open(sweep / "results.csv") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 2 and all(r["status"] == "completed" for r in rows), rows
    assert all(float(r["val_loss"]) > 0 for r in rows) and all(r["model.d_model"] for r in rows)
    best = load_prior_config(sweep / "best.yaml")
    best_row = min(rows, key=lambda r: float(r["val_loss"]))
    assert best.name == "prior_debug-best" and best.model.d_model == int(best_row["model.d_model"])
    assert "python -m revq_ray.prior --config best.yaml" in (sweep / "best.yaml").read_text()
