"""The GPU check in one run: the ``gpu`` test tier, the training step at the published shapes, and whether
256T-L fits a batch of 128 in 80 GB; prints one table and writes ``benchmarks/results/gpu_check.json``.

    bash benchmarks/gpu_check.sh           # the wrapper (timeouts, python from .venv when present)
    python benchmarks/gpu_check.py --skip-tests --skip-step   # only the memory fit

Budget: under 8 minutes on one GPU (each part has its own timeout). Every figure in the table comes from
this run; nothing is estimated. The projected time of 100 ImageNet epochs of 512T on this GPU is the
measured ``ours`` step time at batch 256 times 500,000 steps (train_step.py's projection).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
RESULTS = ROOT / "benchmarks" / "results"
GB = 1 << 30


def run_tests(timeout: int) -> dict:
    """``pytest -m gpu tests/gpu``: counts of passed/failed/skipped and the tail of the output."""
    t0 = time.time()
    cmd = [sys.executable, "-m", "pytest", "-m", "gpu", "tests/gpu", "-q", "-p", "no:cacheprovider", "-rs"]
    try:
        p = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=timeout)
        tail, rc = (p.stdout + p.stderr)[-3000:], p.returncode
    except subprocess.TimeoutExpired as err:
        tail, rc = f"timed out after {timeout}s: {str(err.stdout)[-2000:]}", 124
    summary = next((ln for ln in reversed(tail.splitlines()) if " in " in ln and "=" in ln), tail[-200:])
    return {"rc": rc, "summary": summary.strip("= "), "seconds": round(time.time() - t0, 1), "tail": tail}


def run_train_step(timeout: int) -> dict:
    """``benchmarks/train_step.py --device cuda`` at the published shapes (batch 256), without the memory
    subprocesses and rectifier variants (time budget); its JSON goes to train_step_cuda.json."""
    out = RESULTS / "train_step_cuda.json"
    cmd = [sys.executable, "benchmarks/train_step.py", "--device", "cuda", "--scale", "full",
           "--repeats", "3", "--steps", "2", "--phase-repeats", "1", "--no-memory", "--no-variants",
           "--out", str(out)]  # fmt: skip
    t0 = time.time()
    try:
        p = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=timeout)
        rc, tail = p.returncode, (p.stdout + p.stderr)[-3000:]
    except subprocess.TimeoutExpired:
        rc, tail = 124, f"timed out after {timeout}s"
    res = {"rc": rc, "seconds": round(time.time() - t0, 1), "tail": tail}
    if rc == 0 and out.is_file():
        res["results"] = json.loads(out.read_text())["results"]
    return res


def memory_fit(groups: int = 256, codes: int = 262144, dim: int = 8, batch: int = 128, budget_gb: float = 80):
    """256T-L (G=256, K=262,144, d=8, vit 512x4) at batch 128: one bf16-autocast training step with the
    trainer's model, clip and fused AdamW on this GPU; peak ``max_memory_allocated`` against ``budget_gb``."""
    from revq_ray.config import ModelConfig
    from revq_ray.core.model import ReVQModel
    from revq_ray.core.optim import build_optimizer, clip_grad_norms_

    dev = torch.device("cuda")
    cfg = ModelConfig.model_validate(
        {"quantizer": {"tokens": groups, "codebook_size": codes},
         "rectifier": {"type": "vit", "width": 512, "depth": 4}}
    )  # fmt: skip
    torch.cuda.reset_peak_memory_stats(dev)
    base = torch.cuda.memory_allocated(dev)
    model = ReVQModel.from_config([32, 8, 8], cfg).to(dev).train()
    opt = build_optimizer(model, lr=1e-4, fused=True)
    groups_ = {g["name"]: g["params"] for g in opt.param_groups}
    z = torch.randn(batch, 32, 8, 8, device=dev)
    times = []
    for _ in range(3):
        torch.cuda.synchronize(dev)
        t0 = time.perf_counter()
        with torch.autocast("cuda", dtype=torch.bfloat16):
            out = model(z)
        out.loss.backward()
        clip_grad_norms_(groups_, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        torch.cuda.synchronize(dev)
        times.append(time.perf_counter() - t0)
    peak = (torch.cuda.max_memory_allocated(dev) - base) / GB
    return {"shape": f"G={groups} K={codes} d={dim} B={batch} vit 512x4", "peak_gb": round(peak, 2),
            "budget_gb": budget_gb, "fits": peak <= budget_gb, "step_s": round(sorted(times)[1], 4),
            "search_budget_mb": model.quantizer.search_budget_mb}  # fmt: skip


def print_table(res: dict) -> None:
    print(f"\nGPU check on {res['gpu']} (torch {res['torch']}), {res['date']}")
    print(f"{'check':44s} {'result':>48s}")
    t = res.get("tests")
    if t:
        print(f"{'pytest -m gpu tests/gpu':44s} {t['summary'][:48]:>48s}")
    s = res.get("train_step", {})
    for cfg_name, r in s.get("results", {}).items():
        for m, v in r["methods"].items():
            cell = f"{v['step_s_median'] * 1e3:.1f} ms/step, {v['ratio_vs_ref']:.2f}x ref"
            print(f"{'train step ' + cfg_name + ' ' + m:44s} {cell:>48s}")
        ours = r["methods"].get("ours")
        if ours and cfg_name == "512T":
            print(f"{'100 ImageNet epochs of 512T (ours, 1 GPU)':44s} "
                  f"{ours['projected_hours_500k_steps']:>45.1f} h")  # fmt: skip
    if s and "results" not in s:
        print(f"{'train step':44s} {'failed rc=' + str(s.get('rc')):>48s}")
    m = res.get("memory_fit")
    if m:
        cell = f"peak {m['peak_gb']} GB of {m['budget_gb']} ({'fits' if m['fits'] else 'DOES NOT FIT'})"
        print(f"{'256T-L batch 128 memory':44s} {cell:>48s}")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--skip-tests", action="store_true")
    ap.add_argument("--skip-step", action="store_true")
    ap.add_argument("--tests-timeout", type=int, default=200)
    ap.add_argument("--step-timeout", type=int, default=200)
    ap.add_argument("--out", default=str(RESULTS / "gpu_check.json"))
    args = ap.parse_args()
    if not torch.cuda.is_available():
        print("gpu_check: no CUDA device here; nothing to check (the CPU tiers cover the rest)")
        return 2
    res: dict = {"gpu": torch.cuda.get_device_name(0), "gpus": torch.cuda.device_count(),
                 "torch": torch.__version__, "date": time.strftime("%Y-%m-%d %H:%M:%S")}  # fmt: skip
    if not args.skip_tests:
        res["tests"] = run_tests(args.tests_timeout)
        print(res["tests"]["tail"][-1500:], flush=True)
    if not args.skip_step:
        res["train_step"] = run_train_step(args.step_timeout)
        print(res["train_step"]["tail"][-1500:], flush=True)
    try:
        res["memory_fit"] = memory_fit()
    except torch.cuda.OutOfMemoryError as err:
        res["memory_fit"] = {"fits": False, "error": str(err)[:300], "peak_gb": None, "budget_gb": 80}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(res, indent=1))
    print_table(res)
    print(f"\nwrote {args.out}")
    ok = res.get("tests", {}).get("rc", 0) == 0 and res["memory_fit"].get("fits")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
