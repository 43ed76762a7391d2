"""The DeepSpeed engine helpers: config, param groups, lr schedule, and (two real gloo ranks) per-module
clipping and reset plumbing that give the same training trajectory at ZeRO 0 and ZeRO 2."""

from __future__ import annotations

import socket

import pytest
import torch
import torch.multiprocessing as mp

from revq_ray.config import ModelConfig, TrainConfig, parse_config
from revq_ray.train import engine as eng

pytestmark = pytest.mark.train

LATENT = [4, 4, 4]


def _model():
    from revq_ray.core.model import ReVQModel

    cfg = parse_config(
        {
            "quantizer": {"tokens": 16, "codebook_size": 8, "reset": {"dead_threshold": 3, "ratio": 0.5}},
            "rectifier": {"type": "cnn", "width": 8, "depth": 1},
        },
        ModelConfig,
    )
    torch.manual_seed(0)
    return ReVQModel.from_config(LATENT, cfg)


def test_deepspeed_config_and_precision():
    t = TrainConfig(batch_size=64, num_workers=2, zero_stage=2)
    ds = eng.deepspeed_config(t, 2)
    assert ds["train_micro_batch_size_per_gpu"] == 32 and ds["train_batch_size"] == 64
    assert ds["zero_optimization"]["stage"] == 2 and ds["gradient_clipping"] == 0.0
    assert ds["optimizer"]["params"]["torch_adam"] is True
    assert "torch_autocast" not in ds  # CPU, precision auto -> fp32
    gpu = eng.deepspeed_config(TrainConfig(use_gpu=True), 1)
    # no module's gradients are all-reduced in bf16 (DeepSpeed's default list tags every Linear/Conv)
    assert gpu["torch_autocast"] == {"enabled": True, "dtype": "bfloat16", "lower_precision_safe_modules": []}
    with pytest.raises(ValueError, match="train.zero_stage=3"):
        eng.deepspeed_config(TrainConfig(zero_stage=3), 1)
    with pytest.raises(ValueError, match="train.batch_size=10.*train.num_workers=3"):
        eng.per_worker_batch(TrainConfig(batch_size=10, num_workers=3))


def test_param_groups_follow_the_reference_recipe():
    t = TrainConfig(lr=0.01)
    groups = eng.param_groups(_model(), t)
    assert [g["name"] for g in groups] == ["codebook", "rectifier"]
    assert (groups[0]["lr"], groups[0]["weight_decay"]) == (0.01, 0.0)
    assert groups[1]["lr"] == pytest.approx(0.0005) and groups[1]["weight_decay"] == 1e-4
    # exponential decay to 5 % over the planned steps, a pure function of the step
    assert eng.lr_factor(0, 100, 0.05) == 1.0
    assert eng.lr_factor(50, 100, 0.05) == pytest.approx(0.05**0.5)
    assert eng.lr_factor(100, 100, 0.05) == pytest.approx(0.05)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, world: int, port: int, stage: int, results: dict, fast: bool = False) -> None:
    import os

    os.environ.update(
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        RANK=str(rank),
        WORLD_SIZE=str(world),
        LOCAL_RANK=str(rank),
    )
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        from revq_ray.core.quantizers import ResetReport

        model = _model()

        def reduce_fn(t):
            dist.all_reduce(t)
            return t

        model.set_reduce_fn(reduce_fn)
        t = TrainConfig(
            batch_size=8 * world,
            num_workers=world,
            zero_stage=stage,
            lr=0.05,
            grad_clip=0.05,
            fused_optimizer=fast,
            channels_last=fast,
            codebook_update="dense",
        )
        engine, names, _ = eng.build_engine(model, t, world)
        g = torch.Generator().manual_seed(100 + rank)  # different data on every rank
        resets = 0
        for step in range(6):
            eng.set_lr(engine.optimizer, step, 6, 0.05)
            out = engine(torch.randn(8, *LATENT, generator=g) * 2)
            engine.backward(out.loss)
            core_norms, core_grads = _core_clip(model, t.grad_clip) if stage == 0 else ({}, {})
            norms = eng.clip_grad_norms_(engine, names, t.grad_clip)
            assert norms["codebook"] > t.grad_clip  # clipping is active in this test
            # nothing left the device: 0-dim tensors, read only when logging
            assert all(isinstance(v, torch.Tensor) and v.dim() == 0 for v in norms.values())
            for k, v in core_norms.items():  # the trainer's clip == revq_ray.core.optim.clip_grad_norms_
                torch.testing.assert_close(norms[k], v, rtol=1e-6, atol=0)
            for n, p in model.named_parameters():
                if n in core_grads:
                    torch.testing.assert_close(p.grad, core_grads[n], rtol=1e-6, atol=1e-9)
            results[f"{stage}{'fast' if fast else ''}/{rank}/norms{step}"] = {
                k: float(v) for k, v in norms.items()
            }
            engine.step()
            if step in (2, 4):
                report = model.quantizer.maybe_reset(torch.Generator().manual_seed(step))
                assert isinstance(report, ResetReport) and report.count > 0
                eng.apply_reset_to_optimizer(engine, report)
                resets += report.count
        key = f"{stage}{'fast' if fast else ''}/{rank}"
        results[key] = {k: v.detach().contiguous().clone() for k, v in engine.module.state_dict().items()}
        results[f"{key}/resets"] = resets
    finally:
        dist.destroy_process_group()


def _core_clip(model, max_norm: float) -> tuple[dict, dict]:
    """The pure-PyTorch per-module clip on copies of the current gradients: (norms, clipped grads by name)."""
    from revq_ray.core.optim import clip_grad_norms_

    copies, by_name = {}, {}
    for name, params in model.param_groups().items():
        ps = []
        for p in params:
            c = torch.nn.Parameter(p.detach().clone())
            c.grad = p.grad.detach().clone()
            ps.append(c)
            by_name[next(n for n, q in model.named_parameters() if q is p)] = c
        copies[name] = ps
    norms = clip_grad_norms_(copies, max_norm)
    return norms, {n: c.grad for n, c in by_name.items()}


def test_zero2_matches_zero0_with_clipping_and_resets():
    """Per-group clipping, reset rows written into ZeRO's fp32 master partitions and cleared Adam moments: the
    partitioned stage must follow the replicated one exactly, and ranks must agree bit for bit."""
    ctx = mp.get_context("spawn")
    with ctx.Manager() as manager:
        out = manager.dict()
        for stage in (0, 2):
            mp.start_processes(_worker, args=(2, _free_port(), stage, out), nprocs=2, start_method="spawn")
        res = dict(out)
    assert res["0/0/resets"] > 0
    for stage in (0, 2):
        for k, v in res[f"{stage}/0"].items():
            if k.endswith("counts"):  # local hit counts since the last reset: per rank by design
                continue
            assert torch.equal(v, res[f"{stage}/1"][k]), f"ranks disagree at ZeRO {stage}: {k}"
    for k, v in res["0/0"].items():
        if k.endswith("counts"):
            continue
        torch.testing.assert_close(res["2/0"][k], v, rtol=1e-5, atol=1e-6, msg=f"ZeRO 2 != ZeRO 0 at {k}")
    # the partitioned clip (fragments + one all-reduce) measures the same norms as the replicated one
    for step in range(6):
        for rank in (0, 1):
            got, want = res[f"2/{rank}/norms{step}"], res[f"0/{rank}/norms{step}"]
            assert got.keys() == want.keys()
            for k in got:
                assert got[k] == pytest.approx(want[k], rel=1e-5), (step, rank, k)


def test_fast_paths_through_deepspeed_match_the_plain_engine():
    """train.fused_optimizer (torch's fused AdamW inside DeepSpeed) and train.channels_last (rectifier convs)
    follow the plain engine's trajectory, resets included, to rounding."""
    ctx = mp.get_context("spawn")
    with ctx.Manager() as manager:
        out = manager.dict()
        for fast in (False, True):
            mp.start_processes(_worker, args=(1, _free_port(), 0, out, fast), nprocs=1, start_method="spawn")
        res = dict(out)
    assert res["0fast/0/resets"] == res["0/0/resets"] > 0
    for k, v in res["0/0"].items():
        torch.testing.assert_close(res["0fast/0"][k], v, rtol=1e-5, atol=1e-6, msg=f"fast != plain at {k}")


def test_fast_path_options_the_trainer_cannot_honour_are_refused():
    from revq_ray.core.model import ReVQModel
    from revq_ray.train.codebook import resolve_codebook_update

    # train.codebook_update: auto = rows_lazy where the codebook is gathered by rows and a rectifier trains
    assert TrainConfig().codebook_update == "auto"
    assert resolve_codebook_update(TrainConfig(), _model()) == "rows_lazy"
    gq = ReVQModel.from_config(
        LATENT, parse_config({"quantizer": {"type": "gq", "tokens": 16, "codebook_size": 8}}, ModelConfig)
    )
    assert resolve_codebook_update(TrainConfig(), gq) == "dense"
    with pytest.raises(ValueError, match="train.codebook_update=rows.*revq or vq"):
        resolve_codebook_update(TrainConfig(codebook_update="rows"), gq)
    ident = ReVQModel.from_config(
        LATENT,
        parse_config({"quantizer": {"tokens": 16, "codebook_size": 8}, "rectifier": {"type": "identity"}},
                     ModelConfig),
    )  # fmt: skip
    assert resolve_codebook_update(TrainConfig(), ident) == "dense"
    with pytest.raises(ValueError, match="train.codebook_update=rows_lazy.*identity"):
        resolve_codebook_update(TrainConfig(codebook_update="rows_lazy"), ident)
    with pytest.raises(ValueError, match="train.channels_last=true needs train.zero_stage=0"):
        eng.check_fast_paths(TrainConfig(channels_last=True, zero_stage=2))
    eng.check_fast_paths(TrainConfig(channels_last=True, fused_optimizer=True))
    # the fast paths are the trainer's defaults: fused AdamW always, channels_last where ZeRO allows it
    assert TrainConfig().fused_optimizer is True
    assert eng.channels_last(TrainConfig()) is True and eng.channels_last(TrainConfig(zero_stage=2)) is False
    eng.check_fast_paths(TrainConfig(zero_stage=2))  # auto channels_last is no conflict
    assert eng.deepspeed_config(TrainConfig(fused_optimizer=True), 1)["optimizer"]["params"]["fused"] is True


def _bf16_worker(rank: int, world: int, port: int, results: dict, mode: str = "dense") -> None:
    import os

    os.environ.update(
        MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK="0", WORLD_SIZE="1", LOCAL_RANK="0"
    )
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    import torch.distributed as dist

    from revq_ray.core.quantizers import nearest_code

    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=0, world_size=1)
    try:
        model = _model()
        t = TrainConfig(batch_size=64, precision="bf16", lr=0.01, codebook_update=mode)
        engine, names, rows = eng.build_engine(model, t, 1)
        results["autocast"] = bool(engine.torch_autocast_enabled())
        # gradients are all-reduced in fp32: no parameter is tagged with a lower communication dtype
        results["comm_dtypes"] = sorted({str(getattr(p, "comm_dtype", p.dtype)) for p in model.parameters()})
        g = torch.Generator().manual_seed(7)
        same = total = 0
        for _ in range(4):
            z = torch.randn(64, *LATENT, generator=g) * 2
            out = engine(z)
            # the fp32 search on the same codebook, outside any autocast
            tokens = model.layout.to_tokens(model.standardizer(z))
            ids = nearest_code(tokens, model.quantizer.codebook.detach())[0]
            same += int((out.ids_bt == ids).sum())
            total += ids.numel()
            results.setdefault("rect_dtype", str(out.rectified_std.dtype))
            eng.backward(engine, out.loss, rows)
            eng.clip(engine, names, rows, t.grad_clip)
            eng.step(engine, rows)
        results["agree"] = same / total
        results["codebook_dtype"] = str(model.quantizer.codebook.dtype)
    finally:
        dist.destroy_process_group()


def test_bf16_engine_picks_the_fp32_codes():
    """train.precision=bf16 through DeepSpeed's torch_autocast on CPU: the training forward's ids equal the
    fp32 search on the same codebook (at e163450 about 5 % differed), gradients travel in fp32, parameters
    stay fp32."""
    ctx = mp.get_context("spawn")
    for mode in ("dense", "rows_lazy"):  # the codebook in DeepSpeed, and on its own row exchange (fp32 only)
        with ctx.Manager() as manager:
            out = manager.dict()
            mp.start_processes(
                _bf16_worker, args=(1, _free_port(), out, mode), nprocs=1, start_method="spawn"
            )
            res = dict(out)
        assert res["autocast"] is True
        assert res["agree"] == 1.0, mode
        assert res["comm_dtypes"] == ["torch.float32"]
        assert res["codebook_dtype"] == "torch.float32" and res["rect_dtype"] == "torch.float32"
