"""The GPU check in one run: every part in its own process with its own timeout, one table, one JSON.

    bash benchmarks/gpu_check.sh                  # the wrapper: installs .whl/ offline, then runs this
    python benchmarks/gpu_check.py --parts ids memory   # some parts only
    python benchmarks/gpu_check.py --device cpu   # the CPU rehearsal (tiny shapes; no figure is a GPU's)

Tier (a), torch only:
- ``ids``: the nearest-code search on the device under bf16 autocast (the trainer's context) gives the same
  ids as the fp32 search on the CPU, at the 512T and 256T-L shapes (G=512 K=16,384 d=4; G=256 K=262,144 d=8).
- ``step``: ``benchmarks/train_step.py`` at the published shapes (512T, 256T-B, 256T-L, batch 256): the
  reference step against ours, ms/step and the ratio; the projected hours of 100 ImageNet epochs of 512T
  (500,000 steps of 256 latents) at the measured ``ours`` step time.
- ``memory``: 256T-L (vit 512x4) at batch 128 and 256, one bf16-autocast training step with the trainer's
  model, per-module clip and fused AdamW: peak ``max_memory_allocated`` (fits: at most 80 GB).

Tier (b), Ray Train + DeepSpeed:
- ``ray``: the debug preset (configs/debug.yaml) on one GPU in bf16 through ``revq_ray.train.run``: a fresh
  run of 10 steps, then the same run name to 20 steps (resumed from its checkpoint), asserting that every
  rank's parameters were on CUDA and DeepSpeed's accelerator was ``cuda`` (the run's workers.json).

Each part runs as ``python benchmarks/gpu_check.py --part NAME`` (train_step.py for ``step``) under its
own timeout; the sum of the default timeouts is 7 min 25 s (plus the wheel install in gpu_check.sh: under 8
min). A part that fails or times out is reported as such and the others still run. Every figure in the
table comes from this run; nothing is estimated. Exit 0 when every part passed, 1 otherwise, 2 when
``--device cuda`` finds no CUDA device.

``--device cpu`` runs the same parts on the CPU at tiny shapes (the search against fp32 at a 16th of the
codebook, train_step.py --quick, the memory step at a 64th of 256T-L's codebook and batch without a peak,
the debug preset on CPU): the rehearsal (tests/gpu/test_rehearsal.py) that proves, on a bare Python 3.12
without a GPU, that every import and code path of the check works from the wheel folder. Its JSON goes to
runs/, never over benchmarks/results/gpu_check.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
RESULTS = ROOT / "benchmarks" / "results"
GB = 1 << 30
PARTS = ("env", "ids", "step", "memory", "ray")
# Seconds per part (sum 445 s): a hung CUDA call or a Ray start that never ends costs one part, not the run.
TIMEOUTS = {"env": 30, "ids": 45, "step": 150, "memory": 60, "ray": 160}
MEMORY_BUDGET_GB = 80  # the published target: 256T-L at batch 128 on one 80 GB GPU


# ------------------------------------------------------------------------------------------------ parts
def part_env(dev: str) -> dict:
    """Versions and where each package was imported from (the wheel folder's target, or the image)."""
    import torch

    res: dict = {"python": platform.python_version(), "torch": torch.__version__, "cuda": torch.version.cuda}
    if dev == "cuda":
        p = torch.cuda.get_device_properties(0)
        res.update(gpu=p.name, gpus=torch.cuda.device_count(), gpu_memory_gb=round(p.total_memory / GB, 1))
    for name in ("ray", "deepspeed", "pydantic", "numpy", "pyarrow"):
        mod = __import__(name)
        res[name] = {"version": mod.__version__, "from": str(Path(mod.__file__).parent.parent)}
    from deepspeed.accelerator import get_accelerator

    res["driver_accelerator"] = get_accelerator().device_name()
    return res


def id_shapes(dev: str) -> dict[str, tuple[int, int, int, int]]:
    """(G, K, d, B) of the search check: the published codebooks on a GPU, a 16th of K on the CPU."""
    full = {"512T": (512, 16384, 4, 64), "256T-L": (256, 262144, 8, 32)}
    if dev == "cuda":
        return full
    return {k: (g, kk // 16, d, b // 4) for k, (g, kk, d, b) in full.items()}


def part_ids(dev: str) -> dict:
    """The device search under bf16 autocast against the fp32 CPU search: identical ids."""
    import torch

    from revq_ray.core.quantizers import nearest_code

    g = torch.Generator().manual_seed(0)
    res: dict = {}
    for name, (G, K, d, B) in id_shapes(dev).items():
        tokens, codebook = torch.randn(B, G, d, generator=g), torch.randn(G, K, d, generator=g)
        ids_cpu, _ = nearest_code(tokens, codebook)
        t0 = time.perf_counter()
        with torch.autocast(dev, dtype=torch.bfloat16):  # the trainer's context: must not matter
            ids_dev, _ = nearest_code(tokens.to(dev), codebook.to(dev))
        ids_dev = ids_dev.cpu()
        res[name] = {
            "shape": f"G={G} K={K} d={d} B={B}",
            "equal": bool(torch.equal(ids_dev, ids_cpu)),
            "mismatches": int((ids_dev != ids_cpu).sum()),
            "ids": ids_cpu.numel(),
            "device_s": round(time.perf_counter() - t0, 3),
        }
    res["ok"] = all(r["equal"] for r in res.values())
    return res


def memory_step(
    dev: str, batch: int, groups: int = 256, codes: int = 262144, dim: int = 8, repeats: int = 3
) -> dict:
    """One bf16-autocast training step of 256T-L (vit 512x4 rectifier) at ``batch``, ``repeats`` times: the
    trainer's model, per-module clip and fused AdamW; the peak allocation on CUDA (none on the CPU)."""
    import torch

    from revq_ray.config import ModelConfig
    from revq_ray.core.model import ReVQModel
    from revq_ray.core.optim import build_optimizer, clip_grad_norms_

    device = torch.device(dev)
    cfg = ModelConfig.model_validate(
        {"quantizer": {"tokens": groups, "codebook_size": codes},
         "rectifier": {"type": "vit", "width": 512, "depth": 4}}
    )  # fmt: skip
    cuda = device.type == "cuda"
    if cuda:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
    model = ReVQModel.from_config([32, 8, 8], cfg).to(device).train()
    opt = build_optimizer(model, lr=1e-4, fused=True)
    groups_ = {g["name"]: g["params"] for g in opt.param_groups}
    z = torch.randn(batch, 32, 8, 8, device=device)
    times = []
    try:
        for _ in range(repeats):
            if cuda:
                torch.cuda.synchronize(device)
            t0 = time.perf_counter()
            with torch.autocast(device.type, dtype=torch.bfloat16):
                out = model(z)
            out.loss.backward()
            clip_grad_norms_(groups_, 1.0)
            opt.step()
            opt.zero_grad(set_to_none=True)
            if cuda:
                torch.cuda.synchronize(device)
            times.append(time.perf_counter() - t0)
        peak = (torch.cuda.max_memory_allocated(device) - base) / GB if cuda else None
    finally:
        del model, opt, groups_, z
        if cuda:
            torch.cuda.empty_cache()
    return {
        "shape": f"G={groups} K={codes} d={dim} B={batch} vit 512x4",
        "peak_gb": None if peak is None else round(peak, 2),
        "fits_80gb": None if peak is None else peak <= MEMORY_BUDGET_GB,
        "step_s": round(sorted(times)[len(times) // 2], 4),
    }


def part_memory(dev: str) -> dict:
    """256T-L at batch 128 (must fit 80 GB) and 256 (reported: out of memory is a result, not a failure)."""
    import torch

    gpu = dev == "cuda"
    res: dict = {}
    for batch in (128, 256):
        try:
            if gpu:
                res[f"B{batch}"] = memory_step(dev, batch)
            else:  # the rehearsal: the code path at a 64th of the codebook and batch, one step
                res[f"B{batch}"] = memory_step(dev, batch // 64, codes=262144 // 64, repeats=1)
        except torch.cuda.OutOfMemoryError as err:
            oom = f"out of memory: {str(err)[:200]}"
            res[f"B{batch}"] = {"peak_gb": None, "fits_80gb": False, "error": oom}
    res["ok"] = res["B128"].get("fits_80gb") is not False and "error" not in res["B128"]
    return res


def part_ray(dev: str) -> dict:
    """The debug preset through Ray Train + DeepSpeed in bf16 on one device: fresh, then resumed."""
    from revq_ray.config import load_config
    from revq_ray.runtime import dashboard_missing
    from revq_ray.train import run

    out = Path(tempfile.mkdtemp(prefix="revq_gpu_check_"))
    gpu = dev == "cuda"
    # A bare image lacks the dashboard's packages: init_ray then starts Ray without it (recorded here).
    res: dict = {"device": dev, "dashboard_missing": dashboard_missing()}
    try:
        for phase, steps in (("fresh", 10), ("resumed", 20)):
            sets = {"name": "gpucheck", "output_dir": str(out), "data.shards": "synthetic",
                    "train.use_gpu": str(gpu).lower(), "train.precision": "bf16", "train.max_failures": 0,
                    "train.cpus_per_worker": 1, "train.max_steps": steps}  # fmt: skip
            cfg = load_config(ROOT / "configs" / "debug.yaml", [f"{k}={v}" for k, v in sets.items()])
            t0 = time.perf_counter()
            result = run(cfg)
            if result.error is not None:
                raise RuntimeError(f"{phase} run failed: {result.error}")
            m = result.metrics
            workers = json.loads((out / "gpucheck" / "workers.json").read_text())
            res[phase] = {
                "steps": int(m["step"]),
                "loss": float(m["loss"]),
                "seconds": round(time.perf_counter() - t0, 1),
                "placement": sorted({(w["param_device"], w["accelerator"]) for w in workers}),
            }
        starts = (out / "gpucheck" / "starts.csv").read_text().split()[1:]
        res["start_steps"] = [int(s.split(",")[1]) for s in starts]
    finally:
        try:
            import ray

            ray.shutdown()
        finally:
            shutil.rmtree(out, ignore_errors=True)
    want = "cuda" if gpu else "cpu"
    placed = [pa for ph in ("fresh", "resumed") for pa in res[ph]["placement"]]
    placed_ok = all(p.split(":")[0] == want and a == want for p, a in placed)
    res["ok"] = (
        res["fresh"]["steps"] == 10 and res["resumed"]["steps"] == 20 and res["start_steps"] == [0, 10]
        and placed_ok and all(res[ph]["loss"] == res[ph]["loss"] for ph in ("fresh", "resumed"))
    )  # fmt: skip
    return res


PART_FNS = {"env": part_env, "ids": part_ids, "memory": part_memory, "ray": part_ray}


# ------------------------------------------------------------------------------------------ orchestration
def _run(cmd: list[str], timeout: int, out: Path) -> dict:
    t0 = time.time()
    try:
        p = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=timeout)
        rc, tail = p.returncode, (p.stdout + p.stderr)[-3000:]
    except subprocess.TimeoutExpired as err:
        rc = 124
        tail = f"timed out after {timeout}s\n" + (err.stdout or b"").decode(errors="replace")[-2000:]
    res: dict = {"rc": rc, "seconds": round(time.time() - t0, 1)}
    if out.is_file():
        res.update(json.loads(out.read_text()))
    if rc != 0:
        res["ok"] = False
        res["tail"] = tail
    return res


def run_part(name: str, dev: str, timeout: int, work: Path) -> dict:
    out = work / f"{name}.json"
    if name == "step":
        step_out = work / "train_step.json"
        cmd = [sys.executable, "benchmarks/train_step.py", "--device", dev, "--no-memory", "--no-variants",
               "--out", str(step_out)]  # fmt: skip
        if dev == "cuda":
            cmd += ["--scale", "full", "--repeats", "3", "--steps", "2", "--phase-repeats", "0"]
        else:
            cmd += ["--quick", "--threads", "1"]
        res = _run(cmd, timeout, out)
        if step_out.is_file():
            data = json.loads(step_out.read_text())
            res["meta"] = {k: data["meta"][k] for k in ("command", "hardware_label", "scale")}
            res["results"] = {
                c: {"shape": r["shape_text"], "check": r["check"], "methods": {
                    m: {k: v[k] for k in ("step_s_median", "ratio_vs_ref", "projected_hours_500k_steps")}
                    for m, v in r["methods"].items()}}
                for c, r in data["results"].items()
            }  # fmt: skip
            res.setdefault("ok", True)
        return res
    me = str(Path(__file__).resolve())
    cmd = [sys.executable, me, "--part", name, "--device", dev, "--part-out", str(out)]
    return _run(cmd, timeout, out)


def print_table(res: dict) -> None:
    env = res["parts"].get("env", {})
    where = env.get("gpu") or "CPU REHEARSAL (tiny shapes: no figure below is a GPU figure)"
    print(f"\nGPU check on {where}: python {env.get('python')}, torch {env.get('torch')}, "
          f"ray {env.get('ray', {}).get('version')}, deepspeed {env.get('deepspeed', {}).get('version')}; "
          f"{res['date']}")  # fmt: skip
    rows: list[tuple[str, str]] = []
    for name, part in res["parts"].items():
        if not part.get("ok", True) and part.get("rc", 0) != 0:
            rows.append((name, f"FAILED rc={part['rc']} after {part['seconds']} s (see the JSON's tail)"))
            continue
        if name == "ids":
            for shape in ("512T", "256T-L"):
                r = part[shape]
                cell = "identical" if r["equal"] else f"{r['mismatches']} of {r['ids']} DIFFER"
                rows.append((f"ids {shape} bf16 autocast vs fp32 CPU", f"{cell} ({r['shape']})"))
        elif name == "step":
            for cfg_name, r in part.get("results", {}).items():
                for m, v in r["methods"].items():
                    cell = f"{v['step_s_median'] * 1e3:.1f} ms/step, {v['ratio_vs_ref']:.2f}x ref"
                    rows.append((f"train step {cfg_name} {m}", cell))
                ours = r["methods"].get("ours")
                if ours and cfg_name == "512T":
                    rows.append(("100 ImageNet epochs of 512T (ours, 1 device)",
                                 f"{ours['projected_hours_500k_steps']:.1f} h"))  # fmt: skip
        elif name == "memory":
            for b in ("B128", "B256"):
                r = part[b]
                if r.get("error"):
                    cell = r["error"][:60]
                elif r["peak_gb"] is None:
                    cell = f"no peak on CPU ({r['shape']}), {r['step_s']} s/step"
                else:
                    fit = "fits" if r["fits_80gb"] else "OVER"
                    cell = f"peak {r['peak_gb']} GB ({fit} 80 GB), {r['step_s']} s/step"
                rows.append((f"256T-L batch {b[1:]} memory", cell))
        elif name == "ray":
            for ph in ("fresh", "resumed"):
                r = part[ph]
                place = ", ".join(f"params {p} / DeepSpeed {a}" for p, a in r["placement"])
                cell = f"step {r['steps']} loss {r['loss']:.4f} in {r['seconds']} s; {place}"
                rows.append((f"debug preset Ray+DeepSpeed bf16 {ph}", cell))
    for k, v in rows:
        print(f"  {k:46s} {v}")
    bad = [n for n, p in res["parts"].items() if not p.get("ok", True)]
    print(f"  {'result':46s} {'all parts passed' if not bad else 'FAILED: ' + ', '.join(bad)}")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--device", choices=["cuda", "cpu"], default="cuda")
    ap.add_argument("--parts", nargs="+", choices=PARTS, default=list(PARTS))
    ap.add_argument("--timeout-scale", type=float, default=1.0, help="multiply every part's timeout")
    ap.add_argument("--out", default=None, help="default: benchmarks/results/gpu_check.json (cpu: runs/)")
    ap.add_argument("--part", choices=list(PART_FNS), help=argparse.SUPPRESS)
    ap.add_argument("--part-out", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.part:  # one part, in its own process
        Path(args.part_out).write_text(json.dumps(PART_FNS[args.part](args.device), indent=1))
        return 0

    import torch

    if args.device == "cuda" and not torch.cuda.is_available():
        print("gpu_check: no CUDA device here (torch.cuda.is_available() is False); "
              "`--device cpu` rehearses the check on the CPU")  # fmt: skip
        return 2
    cpu_out = ROOT / "runs" / "gpu_check_cpu.json"  # the rehearsal: never over the GPU's results
    default_out = RESULTS / "gpu_check.json" if args.device == "cuda" else cpu_out
    out = Path(args.out) if args.out else default_out
    command = " ".join([os.path.relpath(__file__, ROOT)] + sys.argv[1:])
    res: dict = {"device": args.device, "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"), "command": command}
    res["parts"] = {}
    with tempfile.TemporaryDirectory(prefix="revq_gpu_check_parts_") as work:
        for name in args.parts:
            timeout = int(TIMEOUTS[name] * args.timeout_scale)
            print(f"[gpu_check] {name} (timeout {timeout} s) ...", flush=True)
            part = run_part(name, args.device, timeout, Path(work))
            res["parts"][name] = part
            state = "ok" if part.get("ok", True) else "FAILED"
            print(f"[gpu_check] {name}: {state} in {part['seconds']} s", flush=True)
            if "tail" in part:
                print(part["tail"][-1500:], flush=True)
    res["ok"] = all(p.get("ok", True) for p in res["parts"].values())
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(res, indent=1))
    print_table(res)
    print(f"\nwrote {out}")
    return 0 if res["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
