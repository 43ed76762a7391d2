"""The prior trained through Ray Train + DeepSpeed on CPU (a real local Ray, real checkpoints): it learns,
exports, resumes from its newest complete checkpoint, and refuses to resume under other settings or data."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import pytest
import torch

from revq_ray.config import ConfigError

from .conftest import patterned_ids, write_token_dir

# Two Ray Train runs (a fresh one and its resume): about a minute on an idle 2-core machine.
pytestmark = [pytest.mark.train, pytest.mark.slow]

ROOT = Path(__file__).resolve().parents[2]


def _cfg(tokens: Path, out: Path, name: str, **overrides):
    from revq_ray.prior.config import load_prior_config

    base = {
        "name": name,
        "output_dir": str(out),
        "data.tokens": str(tokens),
        "train.log_every": 1,
        "train.cpus_per_worker": 0.5,
        "train.max_failures": 0,
    }
    base.update(overrides)
    return load_prior_config(ROOT / "configs" / "prior_debug.yaml", [f"{k}={v}" for k, v in base.items()])


def _run(cfg):
    from revq_ray.prior import train

    result = train(cfg)
    assert result.error is None, result.error
    return result


def _metrics(run_dir: Path) -> list[dict[str, str]]:
    with open(run_dir / "metrics.csv", newline="") as f:
        return list(csv.DictReader(f))


def test_prior_trains_checkpoints_and_resumes(ray_local, tmp_path):
    ids, labels = patterned_ids(160, 8, 6, 3)
    tokens = write_token_dir(
        tmp_path / "tokens", ids, codebook_size=6, labels=labels, class_names=["a", "b", "c"]
    )
    k = 12
    first = _run(_cfg(tokens, tmp_path, "p", **{"train.max_steps": k, "train.checkpoint_every": 5}))
    assert first.metrics["step"] == k
    run_dir = tmp_path / "p"
    # checkpoints at 5, 10 and the last step; keep_checkpoints=2 pruned the oldest; each one complete
    ckpts = sorted(p.name for p in run_dir.glob("checkpoint_step*"))
    assert ckpts == ["checkpoint_step000000010", "checkpoint_step000000012"]
    assert json.loads((run_dir / ckpts[-1] / "complete.json").read_text())["step"] == k
    rows = _metrics(run_dir)
    assert [int(r["step"]) for r in rows] == list(range(1, k + 1))
    assert float(rows[-1]["loss"]) < float(rows[0]["loss"])  # it learns the per-class patterns
    assert math.isfinite(float(rows[-1]["val_loss"]))
    # resume: the same name, more steps -> continues from step 12, every step logged once
    second = _run(_cfg(tokens, tmp_path, "p", **{"train.max_steps": k + 6, "train.checkpoint_every": 5}))
    assert second.metrics["step"] == k + 6
    starts = (run_dir / "starts.csv").read_text().split()[1:]
    assert [int(s.split(",")[1]) for s in starts] == [0, k]
    assert [int(r["step"]) for r in _metrics(run_dir)] == list(range(1, k + 7))
    # the export is what sampling loads, and it knows what it was trained on
    from revq_ray.prior import load_prior, sample

    prior = load_prior(run_dir)
    assert prior.meta["class_names"] == ["a", "b", "c"] and prior.spec.num_classes == 3
    assert prior.meta["tokenizer"]["tokens"] == 8 and prior.meta["tokenizer"]["codebook_size"] == 6
    out = sample(prior, [0, 2], 4, seed=0)
    assert out.shape == (8, 8) and out.dtype == torch.int64
    # other settings, or another token dataset, under the same name: refused before any worker starts
    from revq_ray.prior.driver import build_trainer

    with pytest.raises(ConfigError, match=r"run p already exists in .* other settings: model.d_model"):
        build_trainer(_cfg(tokens, tmp_path, "p", **{"model.d_model": 64}))
    other = write_token_dir(tmp_path / "other", ids[::-1].copy(), codebook_size=6, labels=labels[::-1])
    with pytest.raises(ConfigError, match=r"data.tokens \(manifest sha256\)"):
        build_trainer(_cfg(other, tmp_path, "p"))
