"""The GPU path, end to end: Ray Train + DeepSpeed in bf16 on one GPU (fresh run and resume), ZeRO-2 on two
GPUs when present, the CUDA search against the fp32 CPU search, a Tokenizer round trip on CUDA, and the
auto search budget. Skipped where CUDA is absent (tests/gpu/conftest.py)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

pytestmark = pytest.mark.gpu

ROOT = Path(__file__).resolve().parents[2]


def _debug_cfg(out: Path, name: str, **overrides):
    from revq_ray.config import load_config

    base = {
        "name": name,
        "output_dir": str(out),
        "data.shards": "synthetic",
        "train.use_gpu": True,
        "train.precision": "bf16",
        "train.max_failures": 0,
        "train.cpus_per_worker": 1,
    }
    base.update(overrides)
    return load_config(ROOT / "configs" / "debug.yaml", [f"{k}={v}" for k, v in base.items()])


def _fit(cfg):
    from revq_ray.train import run

    result = run(cfg)
    assert result.error is None, result.error
    return result


def test_search_on_cuda_equals_fp32_cpu():
    from revq_ray.core.quantizers import nearest_code

    g = torch.Generator().manual_seed(0)
    for G, K, d, B in [(512, 4096, 4, 64), (256, 16384, 8, 32)]:
        tokens, codebook = torch.randn(B, G, d, generator=g), torch.randn(G, K, d, generator=g)
        ids_cpu, _ = nearest_code(tokens, codebook)
        with torch.autocast("cuda", dtype=torch.bfloat16):  # the trainer's context: must not matter
            ids_gpu, _ = nearest_code(tokens.cuda(), codebook.cuda())
        assert torch.equal(ids_gpu.cpu(), ids_cpu)


def test_auto_search_budget_follows_free_memory():
    from revq_ray.core.quantizers.search import CPU_AUTO_BUDGET_MB, plan_search, resolve_budget_mb

    mb = resolve_budget_mb(0, "cuda")
    assert mb >= CPU_AUTO_BUDGET_MB
    free = torch.cuda.mem_get_info()[0] / (1 << 20)
    assert mb <= max(CPU_AUTO_BUDGET_MB, free)
    # 256T-L at batch 128: more than one group per chunk (256 Python iterations per forward at 256 MB)
    plan = plan_search(128, 256, 262144, 8, budget_mb=0, device="cuda")
    assert plan.group_chunk > 1, plan


def test_debug_preset_trains_and_resumes_on_one_gpu(tmp_path):
    first = _fit(_debug_cfg(tmp_path, "gpu1", **{"train.max_steps": 10}))
    assert first.metrics["step"] == 10 and math.isfinite(first.metrics["loss"])
    second = _fit(_debug_cfg(tmp_path, "gpu1", **{"train.max_steps": 20}))
    assert second.metrics["step"] == 20
    starts = (tmp_path / "gpu1" / "starts.csv").read_text().split()[1:]
    assert [int(s.split(",")[1]) for s in starts] == [0, 10]
    # the model on CUDA and DeepSpeed's CUDA accelerator, though tests/conftest.py sets DS_ACCELERATOR=cpu
    workers = json.loads((tmp_path / "gpu1" / "workers.json").read_text())
    assert {(w["param_device"].split(":")[0], w["accelerator"]) for w in workers} == {("cuda", "cuda")}


def test_zero2_on_two_gpus(tmp_path, gpus):
    if gpus < 2:
        pytest.skip(f"needs 2 GPUs, found {gpus}")
    result = _fit(
        _debug_cfg(tmp_path, "gpu2", **{"train.num_workers": 2, "train.zero_stage": 2, "train.max_steps": 10})
    )
    assert result.metrics["step"] == 10 and math.isfinite(result.metrics["loss"])


def test_tokenizer_round_trip_on_cuda(tmp_path):
    from revq_ray.core.model import ReVQModel
    from revq_ray.tokenizer import Tokenizer
    from revq_ray.vae.builtin import ImageConvVAE

    torch.manual_seed(0)
    vae = ImageConvVAE(image_size=16, width=8, latent_channels=4).eval()
    vae.save_pretrained(tmp_path / "vae")
    x = torch.rand(32, 3, 16, 16)
    with torch.no_grad():
        latents = vae.encode(x)
    model = ReVQModel([4, 2, 2], {"quantizer": {"tokens": 4, "codebook_size": 16},
                                  "rectifier": {"type": "cnn", "width": 16, "depth": 1}})  # fmt: skip
    model.standardizer.fit([latents])
    model.init_codebook(latents, generator=torch.Generator().manual_seed(0))
    model.eval().save_pretrained(tmp_path / "model")
    cpu = Tokenizer.build(f"builtin:{tmp_path / 'vae'}", tmp_path / "model", device="cpu")
    gpu = Tokenizer.build(f"builtin:{tmp_path / 'vae'}", tmp_path / "model", device="cuda")
    ids = gpu.encode(x)
    assert ids.device.type == "cuda"
    assert torch.equal(ids.cpu(), cpu.encode(x))
    rec = gpu.decode(ids)
    torch.testing.assert_close(rec.cpu(), cpu.decode(ids.cpu()), rtol=1e-4, atol=1e-4)
