"""Ray Train + DeepSpeed on CPU, end to end, on real latents (Fashion-MNIST through taef2).

1 and 2 workers at ZeRO 0 and 2 reduce the loss; after synchronized resets both workers hold bit-identical
state; a worker killed mid-run is replaced and every planned step is done exactly once; a stopped run
resumes from its last checkpoint.
"""

from __future__ import annotations

import json
import math
import re

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
    # One worker is what most other tests here train with; two workers under ZeRO-2 make every assertion
    # below stronger (ranks agree after resets), so the default run keeps that one.
    [pytest.param(1, 0, marks=pytest.mark.extended), pytest.param(2, 0, marks=pytest.mark.extended), (2, 2)],
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
    # where each rank's model and DeepSpeed's accelerator were (on a GPU run: cuda and cuda)
    placed = json.loads((run_dir / "workers.json").read_text())
    assert [(w["param_device"], w["accelerator"]) for w in placed] == [("cpu", "cpu")] * workers
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


# The default run trains decoder-weighted position tokens in test_rerun_with_same_name_resumes.
@pytest.mark.extended
def test_decoder_weighted_position_layout_trains_and_exports(ray_local, latent_shards, tmp_path):
    """model.weighting=decoder measures taef2's channel sensitivity when the run is planned; the export keeps
    the weights and the channel order, so ids decode through the tokenizer the same way after a reload."""
    from revq_ray.core.model import ReVQModel
    from revq_ray.data.shards import read_manifest

    from .conftest import SHARED

    if "taef2" not in read_manifest(str(latent_shards)).vae:
        pytest.skip(f"needs the taef2 latents of {SHARED} (../shared): synthetic latents have no decoder")
    vae = f"taesd:{SHARED / 'models' / 'taef2'}"
    cfg = make_cfg(
        latent_shards,
        tmp_path,
        "weighted",
        **{
            "vae": vae,
            "model.layout": "position",
            "model.weighting": "decoder",
            "model.weighting_samples": 16,
            "model.quantizer.tokens": 256,
            "model.quantizer.codebook_size": 16,
            "train.max_steps": 6,
        },
    )
    _run(cfg)
    model = ReVQModel.from_pretrained(str(tmp_path / cfg.name / "export" / "latest"))
    w = model.standardizer.channel_weight
    assert float(w.mean()) == pytest.approx(1.0, rel=1e-5)
    # taef2 cares about a few of its 32 channels far more than the rest (measured: 0.008 .. 15)
    assert float(w.max()) > 5 and float(w.min()) < 0.1, w
    assert model.channel_order.tolist() == torch.argsort(w, descending=True, stable=True).tolist()
    from revq_ray.tokenizer import Tokenizer

    tok = Tokenizer.build(vae, tmp_path / cfg.name / "export" / "latest")
    images = torch.rand(2, 3, 64, 64)
    ids = tok.encode(images)
    assert ids.shape == (2, 256) and int(ids.max()) < 16
    out = tok.decode(ids)
    assert out.shape == (2, 3, 64, 64) and float(out.min()) >= 0.0 and float(out.max()) <= 1.0
    with torch.no_grad():  # the tokenizer decodes through the saved weights and order
        assert torch.equal(tok.decode_latents(ids), model.decode(ids))


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
    """In bf16 (DeepSpeed's torch_autocast on CPU, the GPU default), fresh and resumed; on taef2 latents also
    decoder-weighted in the position layout (the weights are measured once, then come from the checkpoint)."""
    from revq_ray.data.shards import read_manifest

    from .conftest import SHARED

    k = 4
    bf16 = {"train.epochs": 10, "train.precision": "bf16"}
    weighted = "taef2" in read_manifest(str(latent_shards)).vae
    if weighted:
        bf16.update(
            {
                "vae": f"taesd:{SHARED / 'models' / 'taef2'}",
                "model.layout": "position",
                "model.weighting": "decoder",
                "model.weighting_samples": 16,
            }
        )
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
    if weighted:  # taef2 cares about a few of its 32 channels far more than the rest (measured: 0.008 .. 15)
        w = model.standardizer.channel_weight
        assert float(w.max()) > 5 and float(w.min()) < 0.1, w
        assert model.channel_order.tolist() == torch.argsort(w, descending=True, stable=True).tolist()
    # the same name under other settings is another run: refused before any worker starts, keys named
    from revq_ray.train import build_trainer

    other = make_cfg(
        latent_shards, tmp_path, "resume", **{**bf16, "train.max_steps": 3 * k, "train.lr": 0.02}
    )
    with pytest.raises(ConfigError, match=r"run resume already exists in .* other settings: train.lr"):
        build_trainer(other)


def test_gq_without_logvar_is_a_clear_error(ray_local, latent_shards, tmp_path):
    from revq_ray.train import build_trainer

    cfg = make_cfg(latent_shards, tmp_path, "gq", **{"model.quantizer.type": "gq"})
    with pytest.raises(ConfigError, match="has_logvar"):
        build_trainer(cfg)


def test_non_finite_training_stops_naming_the_step_and_exports_nothing_non_finite(
    ray_local, tmp_path, capsys
):
    """Finite but absurd latents (1e30; the manifest's statistics describe normal-scale latents, as when
    shards were replaced after the manifest was written) pass the reader and make the loss non-finite: the
    run must fail naming the step, and no export may hold non-finite weights."""
    import numpy as np
    from safetensors.torch import load_file

    from revq_ray.core.stats import RunningStats
    from revq_ray.data.shards import ShardWriter
    from revq_ray.data.synthetic import synthetic_latents
    from revq_ray.train.driver import main

    from .conftest import ROOT

    shards = tmp_path / "huge"
    z, lv = synthetic_latents(512, (16, 8, 8), seed=0)
    with ShardWriter(shards, shard_size=256) as w:
        w.write_batch([f"{i:05d}" for i in range(512)], z * np.float32(1e30), lv)
    manifest = w.manifest(vae="synthetic")
    manifest.stats = RunningStats((16, 8, 8)).update(torch.from_numpy(z)).state_dict()
    manifest.save(shards)
    sets = [f"data.shards={shards}", f"output_dir={tmp_path}", "name=nanrun", "train.max_failures=0"]
    sets += ["data.val_items=64", "train.cpus_per_worker=0.5"]
    argv = ["--config", str(ROOT / "configs" / "debug.yaml")]
    for kv in sets:
        argv += ["--set", kv]
    assert main(argv) == 1
    err = capsys.readouterr().err
    assert re.search(r"error: .*non-finite loss .* training stopped at step \d+", err), err[-3000:]
    for f in (tmp_path / "nanrun" / "export").glob("*/model.safetensors"):
        assert all(torch.isfinite(t).all() for t in load_file(str(f)).values()), f


@pytest.mark.extended
def test_sigkill_of_a_non_zero_rank_repeats_and_loses_no_step(ray_local, latent_shards, tmp_path):
    """Kill rank 1 of a 2-worker group from outside (SIGKILL, mid-run, not at a step boundary of our
    choosing): the group restarts from the last checkpoint, and the append-only step log shows every planned
    step committed exactly once (the rolled-back ones visibly redone), in agreement with metrics.csv."""
    import os
    import signal
    import threading
    import time

    from revq_ray.train.logs import STEPS_FILE, committed_steps, read_step_log

    cfg = make_cfg(
        latent_shards,
        tmp_path,
        "kill",
        **{"train.num_workers": 2, "train.epochs": 6, "train.checkpoint_every": 3, "train.max_failures": 1},
    )
    run_dir = tmp_path / "kill"
    killed: dict[str, int] = {}

    def killer() -> None:
        deadline, ckpt_seen = time.time() + 600, 0.0
        while time.time() < deadline and not killed:
            try:
                done = [s for _, steps in read_step_log(run_dir / STEPS_FILE) for s in steps]
                workers = json.loads((run_dir / "workers.json").read_text())
            except (OSError, ValueError):
                done, workers = [], []
            if not ckpt_seen and list(run_dir.glob("checkpoint_*")):
                ckpt_seen = time.time()
            # a little after the first checkpoint is stored, so that Ray Train has registered it
            if ckpt_seen and time.time() - ckpt_seen > 2.5 and done:
                pid = next(w["pid"] for w in workers if w["rank"] == 1)
                os.kill(pid, signal.SIGKILL)
                killed.update(pid=pid, at=max(done))
            time.sleep(0.05)

    t = threading.Thread(target=killer, daemon=True)
    t.start()
    result = _run(cfg)
    t.join(timeout=5)
    assert killed, "the worker was never killed: the test would not test a failure"
    attempts = read_step_log(run_dir / STEPS_FILE)
    total = result.metrics["step"]
    assert len(attempts) == 2, attempts
    (s0, first), (s1, second) = attempts
    assert s0 == 0 and s1 % 3 == 0 and 0 < s1 <= max(first), (s1, first)  # resumed at a checkpoint
    assert second == list(range(s1 + 1, total + 1))
    assert committed_steps(attempts) == list(range(1, total + 1))  # every step committed exactly once
    assert [int(r["step"]) for r in read_metrics(run_dir)] == list(range(1, total + 1))
