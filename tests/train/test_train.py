"""Ray Train + DeepSpeed on CPU, end to end, on real latents (Fashion-MNIST through taef2).

1 and 2 workers at ZeRO 0 and 2 reduce the loss; after synchronized resets both workers hold bit-identical
state; a worker killed mid-run is replaced and every planned step is done exactly once; a stopped run
resumes from its last checkpoint.
"""

from __future__ import annotations

import math

import pytest
import torch

from revq_ray.config import ConfigError

from .conftest import make_cfg, read_metrics

pytestmark = [pytest.mark.train, pytest.mark.slow]


def _run(cfg):
    from revq_ray.train import run

    result = run(cfg)
    assert result.error is None, result.error
    return result


@pytest.mark.parametrize(
    ("workers", "zero"),
    [(1, 0), pytest.param(2, 0, marks=pytest.mark.extended), (2, 2)],
    ids=["1w-zero0", "2w-zero0", "2w-zero2"],
)
def test_training_reduces_loss_and_ranks_agree(ray_local, latent_shards, tmp_path, workers, zero):
    cfg = make_cfg(
        latent_shards,
        tmp_path,
        f"loss{workers}{zero}",
        **{
            "train.num_workers": workers,
            "train.zero_stage": zero,
            "train.epochs": 3,
            "train.lr": 0.05,  # a short run: a larger step than the presets' so the trend beats batch noise
            "train.export_all_ranks": True,
            # A reset after each epoch; codes with fewer than 2 hits count as dead, so resets do happen.
            "model.quantizer.reset.dead_threshold": 2,
        },
    )
    result = _run(cfg)
    m = result.metrics
    run_dir = tmp_path / cfg.name
    assert m["run_dir"] == str(run_dir) and math.isfinite(m["val_mse"])
    rows = read_metrics(run_dir)
    steps = [int(r["step"]) for r in rows]
    assert steps == list(range(1, len(steps) + 1)) and len(steps) % 3 == 0 and len(steps) >= 18
    losses = [float(r["loss"]) for r in rows]
    spe = len(losses) // 3
    first, last = sum(losses[:spe]) / spe, sum(losses[-spe:]) / spe  # mean over the first and last epoch
    assert last < 0.9 * first, losses
    assert sum(int(r["reset_codes"]) for r in rows) > 0, "no reset happened: the test would not test resets"
    # validation ran every epoch; the rectifier helps
    vals = [float(r["val_mse"]) for r in rows if r["val_mse"]]
    assert vals and m["val_mse"] <= m["val_mse_norect"] * 1.05
    # every rank holds the same model, bit for bit (codebook after resets, rectifier, standardizer)
    from safetensors.torch import load_file

    states = [load_file(str(run_dir / "ranks" / f"rank{r}.safetensors")) for r in range(workers)]
    for s in states[1:]:
        assert s.keys() == states[0].keys()
        for k in s:
            assert torch.equal(s[k], states[0][k]), k
    # the export loads and agrees with the final state
    from revq_ray.core.model import ReVQModel

    model = ReVQModel.from_pretrained(str(run_dir / "export" / "latest"))
    assert torch.equal(model.quantizer.codebook.detach(), states[0]["quantizer.codebook"])
    assert (run_dir / "export" / "best" / "model.safetensors").is_file()
    assert list((run_dir / "tensorboard").glob("events.*"))


def test_worker_failure_is_recovered_without_repeating_or_losing_steps(ray_local, latent_shards, tmp_path):
    # Checkpoint every 3 steps, rank 0 dies after step 5: steps 4-5 are rolled back and redone once.
    cfg = make_cfg(
        latent_shards,
        tmp_path,
        "fail",
        **{"train.epochs": 2, "train.checkpoint_every": 3, "train.fail_at_step": 5, "train.max_failures": 1},
    )
    result = _run(cfg)
    run_dir = tmp_path / "fail"
    rows = read_metrics(run_dir)
    steps = [int(r["step"]) for r in rows]
    total = result.metrics["step"]
    assert steps == list(range(1, total + 1)), steps  # every planned step exactly once
    assert result.metrics["epoch"] == pytest.approx(2.0)  # no epoch lost
    assert [float(r["epoch"]) for r in rows][-1] == pytest.approx(2.0)
    starts = (run_dir / "starts.csv").read_text().split()[1:]
    assert [int(s.split(",")[1]) for s in starts] == [0, 3]  # the replaced group resumed at the checkpoint
    assert (run_dir / ".fail_at_step.done").is_file()


def test_rerun_with_same_name_resumes(ray_local, latent_shards, tmp_path):
    """In bf16 (DeepSpeed's torch_autocast on CPU, the GPU default), fresh and resumed."""
    k = 4
    bf16 = {"train.epochs": 10, "train.precision": "bf16"}
    first = _run(make_cfg(latent_shards, tmp_path, "resume", **{**bf16, "train.max_steps": k}))
    assert first.metrics["step"] == k
    second = _run(make_cfg(latent_shards, tmp_path, "resume", **{**bf16, "train.max_steps": 2 * k}))
    assert second.metrics["step"] == 2 * k
    run_dir = tmp_path / "resume"
    starts = (run_dir / "starts.csv").read_text().split()[1:]
    assert [int(s.split(",")[1]) for s in starts] == [0, k]
    rows = read_metrics(run_dir)
    assert [int(r["step"]) for r in rows] == list(range(1, 2 * k + 1))
    assert all(math.isfinite(float(r["loss"])) for r in rows)
    # the exported model (fp32, as the Tokenizer runs it) picks the codes training picked: bf16 touched only
    # the rectifier
    from revq_ray.core.model import ReVQModel

    model = ReVQModel.from_pretrained(str(run_dir / "export" / "latest"))
    assert model.quantizer.codebook.dtype == torch.float32


def test_gq_without_logvar_is_a_clear_error(ray_local, latent_shards, tmp_path):
    from revq_ray.train import build_trainer

    cfg = make_cfg(latent_shards, tmp_path, "gq", **{"model.quantizer.type": "gq"})
    with pytest.raises(ConfigError, match="has_logvar"):
        build_trainer(cfg)
