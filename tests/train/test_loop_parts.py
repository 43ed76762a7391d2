"""The worker loop's parts without Ray: the schedule, the counts traffic it causes, and device placement of
the model the loop builds (checked on the ``meta`` device: any tensor left on the CPU raises, as on a GPU)."""

from __future__ import annotations

import pytest
import torch

from revq_ray.config import ResetConfig, RunConfig, TrainConfig
from revq_ray.core.stats import RunningStats
from revq_ray.train.checkpoint import TrainerState
from revq_ray.train.plan import RunPlan
from revq_ray.train.schedule import Schedule

pytestmark = pytest.mark.train


def _walk(schedule: Schedule, steps: int) -> list:
    state = TrainerState()
    return [schedule.advance(state, 8) for _ in range(steps)]


def test_schedule_says_what_is_due():
    tc = TrainConfig(log_every=5, val_every=0, checkpoint_every=0)
    s = Schedule(
        tc, ResetConfig(interval=1, unit="epochs"), steps_per_epoch=10, total_steps=30, resets_on=True
    )
    due = _walk(s, 30)
    assert [i + 1 for i, d in enumerate(due) if d.log] == [5, 10, 15, 20, 25, 30]
    assert [i + 1 for i, d in enumerate(due) if d.val] == [10, 20, 30]
    assert [i + 1 for i, d in enumerate(due) if d.ckpt] == [10, 20, 30]
    assert [i + 1 for i, d in enumerate(due) if d.reset] == [10, 20]  # never after the last step
    assert [i + 1 for i, d in enumerate(due) if d.last] == [30]
    # counts are all-reduced only where a reset or a report with usage needs them, not at plain log steps
    assert [i + 1 for i, d in enumerate(due) if d.usage] == [10, 20, 30]
    steps_reset = Schedule(
        TrainConfig(log_every=1, val_every=7, checkpoint_every=4),
        ResetConfig(interval=3, unit="steps"),
        steps_per_epoch=100,
        total_steps=12,
        resets_on=True,
    )
    due = _walk(steps_reset, 12)
    assert [i + 1 for i, d in enumerate(due) if d.reset] == [3, 6, 9]
    assert [i + 1 for i, d in enumerate(due) if d.val] == [7, 12]
    assert [i + 1 for i, d in enumerate(due) if d.ckpt] == [4, 8, 12]
    assert [i + 1 for i, d in enumerate(due) if d.usage] == [3, 4, 6, 7, 8, 9, 12]
    off = Schedule(TrainConfig(), ResetConfig(), 10, 30, resets_on=False)
    assert not any(d.reset for d in _walk(off, 30))


def _cfg(**train) -> RunConfig:
    return RunConfig.model_validate(
        {
            "model": {
                "quantizer": {"tokens": 16, "codebook_size": 32, "reset": {"dead_threshold": 2}},
                "rectifier": {"type": "vit", "width": 32, "head_dim": 16, "depth": 1},
            },
            "train": {"log_every": 1, **train},
        }
    )


def _plan(n: int = 256) -> tuple[RunPlan, torch.Tensor]:
    z = torch.randn(n, 4, 4, 4, generator=torch.Generator().manual_seed(0)) * 3 + 1
    stats = RunningStats((4, 4, 4))
    stats.update(z)
    plan = RunPlan(
        latent_shape=[4, 4, 4], has_logvar=False, stats=stats.state_dict(), vae="", train_count=n,
        val_count=0, has_val=False, micro_batch=8, steps_per_epoch=4, total_steps=8, storage_path="/tmp",
        name="x", run_dir="/tmp/x",
    )  # fmt: skip
    return plan, z.reshape(n, 16, 4)


def test_model_is_initialized_on_the_cpu_then_moved(tmp_path):
    """At e163450 the codebook init fed CPU tokens to a model already on the GPU (a crash on every fresh GPU
    run). The meta device raises the same way for any CPU tensor meeting a device module."""
    from revq_ray.train.loop import build_model

    plan, tokens = _plan()
    model = build_model(_cfg(), plan, tokens, torch.device("meta"))
    assert {p.device.type for p in model.parameters()} == {"meta"}
    assert {b.device.type for b in model.buffers()} == {"meta"}
    out = model(torch.randn(8, 4, 4, 4, device="meta"))  # the training forward places nothing on the CPU
    out.loss.backward()
    from revq_ray.core.optim import clip_grad_norms_

    norms = clip_grad_norms_(model.param_groups(), 1.0)
    assert all(v.device.type == "meta" for v in norms.values())
    # the same init on the CPU gives a model that is not the random init
    cpu = build_model(_cfg(), plan, tokens, torch.device("cpu"))
    assert cpu.quantizer.codebook.abs().max() < 20  # standardized sample, not raw latents
    rows = set(map(tuple, cpu.quantizer.codebook[0].tolist()))
    std_tokens = cpu.layout.to_tokens(cpu.standardizer(cpu.layout.to_latent(tokens)))
    assert rows <= set(map(tuple, std_tokens[:, 0].tolist()))
    with pytest.raises(RuntimeError, match="codebook-init sample"):
        build_model(_cfg(), plan, None, torch.device("cpu"))
    build_model(_cfg(), plan, None, torch.device("cpu"), fresh=False)  # a checkpoint will restore it


def test_counts_are_reduced_once_per_reset_and_never_at_plain_log_steps():
    """Traffic of the (G, K) counts: one all-reduce per reset (which also yields the usage statistics) and one
    per report that shows usage; none at a plain log step."""
    from revq_ray.train.loop import build_model, usage_and_reset
    from revq_ray.train.schedule import Due

    plan, tokens = _plan()
    model = build_model(_cfg(), plan, tokens, torch.device("cpu"))
    calls: list[tuple[int, ...]] = []

    def counting_sum(t: torch.Tensor) -> torch.Tensor:
        calls.append(tuple(t.shape))
        return t

    model.set_reduce_fn(counting_sum)
    model.train()
    model(torch.randn(8, 4, 4, 4))
    q, gen = model.quantizer, torch.Generator().manual_seed(0)
    assert usage_and_reset(q, Due(log=True), gen) == (None, None) and calls == []
    usage, report = usage_and_reset(q, Due(log=True, reset=True), gen)
    assert calls == [(16, 32)] and report is not None and usage["usage"].shape == (16,)
    assert int(q.counts.sum()) == 0  # the reset zeroed the counts it used
    model(torch.randn(8, 4, 4, 4))
    usage, report = usage_and_reset(q, Due(val=True), gen)
    assert calls == [(16, 32), (16, 32)] and report is None and usage["hits"].sum() == 8 * 16
