"""One ReVQ training step: revq-ray's fast step against the reference recipe, side by side.

A step: standardize -> nearest-code search -> quantization loss -> rectifier forward -> both losses'
backward -> gradient-norm clipping per module (codebook, rectifier) to 1 -> AdamW step. Every method starts
from the same weights and sees the same batches on the same device, in one run, with interleaved repeats.

Methods:

* ``ref``: the reference recipe re-implemented here (METHODS.md section 1 and the ReVQ code): ``vmap(cdist +
  min, chunk_size=2)`` search, float counts, dense gather, fp32, ``clip_grad_norm_`` per module, torch's
  default ``AdamW`` over the whole codebook (codebook lr, no wd; rectifier lr * 0.05, wd 1e-4).
* ``ours``: the real ``ReVQModel`` forward (chunked matmul search, ``revq_ray.core.quantizers.search``), the
  rectifier in channels_last, sync-free per-module clipping (``revq_ray.core.optim.clip_grad_norms_``) and
  fused AdamW: what the trainer does by default (``train.fused_optimizer`` on, ``train.channels_last``
  auto). Same semantics as ``ref`` (equal to rounding; tests/core/test_fast_paths.py).
* ``ours-lazy``: ``ours`` plus sparse codebook gradients and the row-sparse lazy AdamW (``RowSparseAdamW``):
  only looked-up rows are touched. Equal to ``ref`` on rows hit every step; rows hit intermittently follow
  lazy-Adam semantics (see revq_ray/core/optim.py).
* ``--compile`` adds ``ours-lazy+compile`` (``torch.compile`` of the rectifier; Triton kernels on CUDA; the
  compile time is excluded from the rate and reported as the first step); ``--bf16`` (default on CUDA) adds
  ``ours-lazy+bf16`` (rectifier under bf16 autocast).

Shapes: ``--scale full`` is the published 512T / 256T-B / 256T-L with batch 256; ``--scale cpu-published``
keeps the CPU codebooks and batches below with the published rectifier widths (512 / 1024 / 512).
``--scale cpu`` (default on CPU) keeps G, d and the rectifier depth, divides K and the batch by the same
factor (so the fraction B / K of codebook rows one step can touch is the published one) and uses
rectifier width ``--cpu-width`` (64); the exact shapes are printed and saved.

Measured: median wall seconds per step over interleaved repeats (the method order rotates every repeat),
steps/s, ratio to ``ref`` (median of the per-repeat ratios); on CPU also the process CPU time per step and
its ratio (robust to other processes on a shared machine); a per-phase breakdown (separate runs with a sync
between phases; there the quantization and rectifier losses are back-propagated separately, the same work);
peak memory per method (CPU: RSS high-water of a fresh subprocess during its steps, above its RSS before
them; CUDA: ``max_memory_allocated`` above the allocation before the steps); the projected time of 100
ImageNet epochs (500,000 steps of 256 latents) at the measured rate, labelled with the hardware and the
shape. A correctness check compares every method's ids and weights with ``ref`` after the first step.

    python benchmarks/train_step.py                             # CPU, scaled shapes, all three configs
    python benchmarks/train_step.py --configs 512T --repeats 9 --steps 1 --threads 1
    python benchmarks/train_step.py --device cuda --compile    # GPU, full shapes (not run by the author)
    python benchmarks/train_step.py --quick                     # tiny smoke run

Prints tables and writes ``benchmarks/results/train_step.json``.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from revq_ray.config import ModelConfig  # noqa: E402
from revq_ray.core.model import ReVQModel  # noqa: E402
from revq_ray.core.optim import build_optimizer, clip_grad_norms_  # noqa: E402
from revq_ray.core.quantizers.grouped import gather_codes  # noqa: E402
from revq_ray.core.quantizers.search import nearest_code  # noqa: E402

MB = 1 << 20
LATENT = (32, 8, 8)  # DC-AE f32c32 at 256x256: 2,048 values (512 tokens of 4 or 256 tokens of 8)
LR = 1e-4  # the reference's base lr (any value times the same work)
EPOCH_STEPS = 1_281_167 // 256  # ImageNet latents per epoch / batch 256
PROJECT_STEPS = 100 * 5_000  # the brief's round 100 epochs x 5,000 steps
PHASES = ("search", "quant", "rectifier", "clip", "optimizer")


@dataclass(frozen=True)
class Shape:
    G: int  # groups = tokens
    K: int  # codes per group
    d: int  # code dim
    W: int  # rectifier width
    L: int  # rectifier depth
    B: int  # batch (latents per step)

    def describe(self) -> str:
        return f"G={self.G} K={self.K} d={self.d} B={self.B} vit {self.W}x{self.L}"


FULL = {
    "512T": Shape(512, 16384, 4, 512, 3, 256),
    "256T-B": Shape(256, 65536, 8, 1024, 4, 256),
    "256T-L": Shape(256, 262144, 8, 512, 4, 256),
}
# CPU: K and B divided by the same factor (B / K, the fraction of codebook rows one step can touch, stays
# the published one); G, d and the rectifier depth unchanged; rectifier width --cpu-width (default 64). The
# factors keep a step at seconds on 2 cores and three methods' codebooks (param, grad, 2 moments) within a
# few GB. Why width 64: at full size on a GPU the reference's search (256 vmapped cdist chunks writing 8.6
# GB of distance matrices at 512T) costs about as much as the rectifier (1.4 TFLOP fwd+bwd on tensor-core
# convs); an estimate, no GPU was measured. On this CPU width 64 gives the reference step a similar split,
# while width 128 makes the CPU step mostly rectifier, which no fast path here changes much on CPU
# (--cpu-width 128).
CPU = {
    "512T": Shape(512, 4096, 4, 64, 3, 64),
    "256T-B": Shape(256, 16384, 8, 64, 4, 64),
    "256T-L": Shape(256, 32768, 8, 64, 4, 32),
}
QUICK = {
    "512T": Shape(512, 256, 4, 32, 1, 8),
    "256T-B": Shape(256, 512, 8, 32, 1, 8),
    "256T-L": Shape(256, 1024, 8, 32, 1, 4),
}


# ------------------------------------------------------------------------------------------ the methods
def _find_nearest(x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The reference's per-group search (ReVQ ``find_nearest``)."""
    dist_mat = torch.cdist(x, y)
    min_dist, indices = torch.min(dist_mat, dim=-1)
    return min_dist, indices


def _nomark(_: str) -> None:
    return None


class RefRecipe:
    """The ReVQ reference training step, re-implemented on its own copy of the weights."""

    name = "ref"

    def __init__(self, model: ReVQModel, device: torch.device):
        self.standardizer = copy.deepcopy(model.standardizer)
        self.layout = model.layout
        self.codebook = torch.nn.Parameter(model.quantizer.codebook.detach().clone())
        self.rectifier = copy.deepcopy(model.rectifier)
        G, K, d = self.codebook.shape
        self.count = torch.zeros(G, K, device=device)  # the reference counts in float
        self.offset = torch.arange(G, device=device) * K
        self.find_nearest = torch.vmap(_find_nearest, in_dims=0, out_dims=0, chunk_size=2)
        self.rect_params = [p for p in self.rectifier.parameters() if p.requires_grad]
        self.opt = torch.optim.AdamW(
            [
                {"params": [self.codebook], "lr": LR, "weight_decay": 0.0},
                {"params": self.rect_params, "lr": LR * 0.05, "weight_decay": 1e-4},
            ]
        )

    def step(self, z: torch.Tensor, mark=None) -> torch.Tensor:
        phased = mark is not None
        mark = mark or _nomark
        z_std = self.standardizer(z)
        tokens = self.layout.to_tokens(z_std)  # (B, G, d)
        B, G, d = tokens.shape
        with torch.no_grad():
            _, idx_gb = self.find_nearest(tokens.permute(1, 0, 2), self.codebook)
            self.count.scatter_add_(-1, idx_gb, torch.ones_like(idx_gb, dtype=self.count.dtype))
        mark("search")
        ids_bt = idx_gb.t()
        xq = self.codebook.view(-1, d)[(ids_bt + self.offset).reshape(-1)].view(B, G, d)
        loss_q = F.mse_loss(xq, tokens.detach())
        if phased:
            loss_q.backward()
            mark("quant")
        rec = self.rectifier(self.layout.to_latent(xq.detach()))
        loss_r = F.mse_loss(rec, z_std)
        (loss_r if phased else loss_q + loss_r).backward()
        mark("rectifier")
        torch.nn.utils.clip_grad_norm_([self.codebook], 1.0)
        torch.nn.utils.clip_grad_norm_(self.rect_params, 1.0)
        mark("clip")
        self.opt.step()
        self.opt.zero_grad()
        mark("optimizer")
        return ids_bt

    def params(self) -> tuple[torch.Tensor, list[torch.Tensor]]:
        return self.codebook.detach(), [p.detach() for p in self.rect_params]


class FastStep:
    """revq-ray's step: the real ReVQModel path plus the opt-in fast paths."""

    def __init__(
        self,
        name: str,
        model: ReVQModel,
        *,
        sparse: bool,
        channels_last: bool = True,
        fused: bool = True,
        compile_rectifier: bool = False,
        bf16: bool = False,
    ):
        self.name = name
        self.model = copy.deepcopy(model)
        self.device_type = next(self.model.parameters()).device.type
        if channels_last:
            self.model.rectifier.to(memory_format=torch.channels_last)
        self.opt = build_optimizer(self.model, lr=LR, sparse_codebook=sparse, fused=fused)
        self.groups = {g["name"]: g["params"] for g in self.opt.param_groups}
        self.bf16 = bf16
        if compile_rectifier:
            self.model.rectifier.compile()

    def _autocast(self):
        if not self.bf16:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device_type, dtype=torch.bfloat16)

    def step(self, z: torch.Tensor, mark=None) -> torch.Tensor:
        if mark is not None:
            return self._phased(z, mark)
        with self._autocast():
            out = self.model(z)
        out.loss.backward()
        clip_grad_norms_(self.groups, 1.0)
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        return out.ids_bt

    def _phased(self, z: torch.Tensor, mark) -> torch.Tensor:
        """The same work as ReVQModel.forward + backward, cut into phases (tests check the model path)."""
        m, q = self.model, self.model.quantizer
        z_std = m.standardizer(z)
        tokens = m.layout.to_tokens(z_std)
        ids_bt, _ = nearest_code(tokens.detach(), q.codebook.detach(), q.search_budget_mb)
        q._count(ids_bt)
        mark("search")
        xq = gather_codes(q.codebook, ids_bt, sparse=q.sparse_grad)
        F.mse_loss(xq, tokens.detach()).backward()
        mark("quant")
        with self._autocast():
            rec = m.rectifier(m.layout.to_latent(xq.detach()))
        F.mse_loss(rec.float(), z_std.float()).backward()
        mark("rectifier")
        clip_grad_norms_(self.groups, 1.0)
        mark("clip")
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        mark("optimizer")
        return ids_bt

    def params(self) -> tuple[torch.Tensor, list[torch.Tensor]]:
        return self.model.quantizer.codebook.detach(), [p.detach() for p in self.groups["rectifier"]]


def method_names(args) -> list[str]:
    names = ["ref", "ours", "ours-lazy"]
    if args.compile:
        names.append("ours-lazy+compile")
    if args.bf16:
        names.append("ours-lazy+bf16")
    return names


def make_method(name: str, model: ReVQModel, device: torch.device):
    if name == "ref":
        return RefRecipe(model, device)
    return FastStep(
        name,
        model,
        sparse="lazy" in name,
        compile_rectifier="compile" in name,
        bf16="bf16" in name,
    )


# ------------------------------------------------------------------------------------------ setup
def build(
    shape: Shape, device: torch.device, n_batches: int, seed: int = 0
) -> tuple[ReVQModel, list[torch.Tensor]]:
    """The shared starting point: one model (every method copies it) and the batches every method sees."""
    cfg = ModelConfig.model_validate(
        {
            "quantizer": {"type": "revq", "tokens": shape.G, "codebook_size": shape.K},
            "rectifier": {"type": "vit", "width": shape.W, "depth": shape.L},
        }
    )
    torch.manual_seed(seed)
    model = ReVQModel.from_config(list(LATENT), cfg)
    # The head starts at zero (identity rectifier); perturb it so that every rectifier layer gets gradient at
    # step 1 (the work is the same either way; the correctness check then covers every parameter).
    torch.nn.init.normal_(model.rectifier.head.weight, std=0.02)
    model.to(device)
    g = torch.Generator().manual_seed(seed + 1)
    # Standardized-like latents (the standardizer is the identity here): N(0, 1), as the quantizer sees them.
    batches = [torch.randn(shape.B, *LATENT, generator=g).to(device) for _ in range(n_batches)]
    return model, batches


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).abs().max())


# ------------------------------------------------------------------------------------------ measurement
def measure_config(cfg_name: str, shape: Shape, args, device: torch.device) -> dict:
    names = method_names(args)
    model, batches = build(shape, device, args.batches)
    methods = {n: make_method(n, model, device) for n in names}
    del model

    # First step (also the warm-up), on batch 0 from identical weights: correctness check and compile time.
    first_s, ids = {}, {}
    for n, m in methods.items():
        sync(device)
        t0 = time.perf_counter()
        ids[n] = m.step(batches[0])
        sync(device)
        first_s[n] = time.perf_counter() - t0
    cb_ref, rect_ref = methods["ref"].params()
    check = {}
    for n, m in methods.items():
        if n == "ref":
            continue
        cb, rect = m.params()
        check[n] = {
            "ids_equal_ref": bool(torch.equal(ids[n].cpu(), ids["ref"].cpu())),
            "codebook_max_abs_diff": max_diff(cb, cb_ref),
            "rectifier_max_abs_diff": max(max_diff(a, b) for a, b in zip(rect, rect_ref)),
        }
    for m in methods.values():  # a second warm-up step (lazy optimizer state, allocator, compiled graphs)
        m.step(batches[1 % len(batches)])
    sync(device)

    # Whole steps, interleaved: repeat r runs the methods in an order rotated by r.
    # Wall time is what a user gets; process CPU time (all threads of this process) is the work done, which
    # other processes' load on a shared machine inflates far less (reported beside it on CPU).
    times: dict[str, list[float]] = {n: [] for n in names}
    cpu_times: dict[str, list[float]] = {n: [] for n in names}
    k = 2
    for r in range(args.repeats):
        order = names[r % len(names) :] + names[: r % len(names)]
        for n in order:
            sync(device)
            t0, c0 = time.perf_counter(), time.process_time()
            for s in range(args.steps):
                methods[n].step(batches[(k + s) % len(batches)])
            sync(device)
            times[n].append((time.perf_counter() - t0) / args.steps)
            cpu_times[n].append((time.process_time() - c0) / args.steps)
        k += args.steps
        line = "  ".join(f"{n} {times[n][-1] * 1e3:8.1f} ({cpu_times[n][-1] * 1e3:.0f} cpu)" for n in names)
        print(f"  [{cfg_name}] repeat {r + 1}/{args.repeats} ms/step: {line}", flush=True)

    # Phase breakdown, interleaved as well.
    phases: dict[str, dict[str, list[float]]] = {n: {p: [] for p in PHASES} for n in names}
    phases_cpu: dict[str, dict[str, list[float]]] = {n: {p: [] for p in PHASES} for n in names}
    for r in range(args.phase_repeats):
        order = names[r % len(names) :] + names[: r % len(names)]
        for n in order:
            last = [0.0, 0.0]

            def mark(phase: str, n=n, last=last) -> None:
                sync(device)
                now, cpu = time.perf_counter(), time.process_time()
                phases[n][phase].append(now - last[0])
                phases_cpu[n][phase].append(cpu - last[1])
                last[0], last[1] = now, cpu

            sync(device)
            last[0], last[1] = time.perf_counter(), time.process_time()
            methods[n].step(batches[(k + r) % len(batches)], mark)

    res: dict = {"shape": asdict(shape), "shape_text": shape.describe(), "check": check, "methods": {}}
    for n in names:
        med = statistics.median(times[n])
        ratios = [rt / t for rt, t in zip(times["ref"], times[n])]
        ph = {p: statistics.median(v) for p, v in phases[n].items() if v}
        ph_cpu = {p: statistics.median(v) for p, v in phases_cpu[n].items() if v}
        cpu_med = statistics.median(cpu_times[n])
        res["methods"][n] = {
            "step_s_median": med,
            "step_s_all": times[n],
            "steps_per_s": 1.0 / med,
            "latents_per_s": shape.B / med,
            "ratio_vs_ref": statistics.median(ratios),
            "ratio_vs_ref_of_medians": statistics.median(times["ref"]) / med,
            "cpu_s_median": cpu_med,
            "cpu_s_all": cpu_times[n],
            "ratio_vs_ref_cpu_time": statistics.median(
                [rt / t for rt, t in zip(cpu_times["ref"], cpu_times[n])]
            ),
            "first_step_s": first_s[n],
            "phases_s_median": ph,
            "phases_sum_s": sum(ph.values()),
            "phases_cpu_s_median": ph_cpu,
            "phases_cpu_sum_s": sum(ph_cpu.values()),
            "projected_hours_500k_steps": PROJECT_STEPS * med / 3600.0,
            "projected_hours_500k_steps_cpu_time": PROJECT_STEPS * cpu_med / 3600.0,
        }
    del methods
    return res


# ------------------------------------------------------------------------------------------ memory
def _rss_kb(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    return -1


def child_memory(cfg_name: str, method: str, args) -> dict:
    """Runs in a fresh subprocess: build, then a few steps of ``method``; peak memory of those steps."""
    device = torch.device(args.device)
    shape = shapes_for(args)[cfg_name]
    model, batches = build(shape, device, 2)
    m = make_method(method, model, device)
    del model
    if device.type == "cuda":
        torch.cuda.synchronize()
        before = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        for s in range(args.mem_steps):
            m.step(batches[s % 2])
        torch.cuda.synchronize()
        return {"peak_extra_mb": (torch.cuda.max_memory_allocated() - before) / MB, "kind": "cuda_allocated"}
    import gc
    import resource

    gc.collect()
    rss_before = _rss_kb("VmRSS")
    try:  # reset the RSS high-water mark (VmHWM) so that it covers the steps only
        Path("/proc/self/clear_refs").write_text("5")
        kind = "VmHWM"
    except OSError:
        kind = "ru_maxrss (includes setup)"
    for s in range(args.mem_steps):
        m.step(batches[s % 2])
    peak = _rss_kb("VmHWM") if kind == "VmHWM" else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return {
        "peak_rss_mb": peak / 1024,
        "rss_before_steps_mb": rss_before / 1024,
        "peak_extra_mb": (peak - rss_before) / 1024,
        "kind": kind,
    }


def measure_memory(cfg_name: str, method: str, args) -> dict:
    cmd = [sys.executable, __file__, "--_child", cfg_name, method] + _forward_args(args)
    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads))
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=args.child_timeout, env=env)
    lines = [ln for ln in p.stdout.splitlines() if ln.startswith("{")]
    if p.returncode != 0 or not lines:
        return {"error": (p.stderr or p.stdout)[-800:]}
    return json.loads(lines[-1])


def _forward_args(args) -> list[str]:
    out = ["--device", args.device, "--threads", str(args.threads), "--scale", args.scale]
    out += ["--cpu-width", str(args.cpu_width)]
    out += ["--mem-steps", str(args.mem_steps)]
    if args.compile:
        out.append("--compile")
    out.append("--bf16" if args.bf16 else "--no-bf16")
    return out


# ---------------------------------------------------------------------------------------- rectifier variants
def rectifier_variants(shape: Shape, args, device: torch.device) -> dict:
    """Rectifier forward + backward alone, per layout / precision / compile setting, against eager fp32."""
    model, batches = build(shape, device, 1)
    base = model.rectifier
    x = batches[0]
    tgt = torch.randn_like(x)
    variants = [("eager fp32", False, False, False), ("channels_last fp32", True, False, False)]
    if args.variant_bf16:
        variants.append(("eager bf16 autocast", False, True, False))
    if args.compile:
        variants.append(("compile fp32", False, False, True))
        variants.append(("compile channels_last", True, False, True))

    def run(m, bf16):
        with torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=bf16):
            y = m(x)
        F.mse_loss(y.float(), tgt).backward()
        return y.detach().float()

    y_ref = run(base, False)
    g_ref = [p.grad.detach().clone() for p in base.parameters()]
    out = {}
    for name, cl, bf16, comp in variants:
        m = copy.deepcopy(base)
        m.zero_grad(set_to_none=True)
        if cl:
            m.to(memory_format=torch.channels_last)
        if comp:
            m.compile()
        sync(device)
        t0 = time.perf_counter()
        y = run(m, bf16)
        sync(device)
        first = time.perf_counter() - t0
        ts = []
        reps = 1 if (bf16 and device.type == "cpu") else args.variant_repeats
        for _ in range(reps):
            m.zero_grad(set_to_none=True)
            sync(device)
            t0 = time.perf_counter()
            run(m, bf16)
            sync(device)
            ts.append(time.perf_counter() - t0)
        rel = max(
            float((p.grad - g).abs().max() / (g.abs().max() + 1e-12)) for p, g in zip(m.parameters(), g_ref)
        )
        out[name] = {
            "fwd_bwd_s_median": statistics.median(ts),
            "first_call_s": first,
            "output_max_abs_diff": max_diff(y, y_ref),
            "grad_max_rel_diff": rel,
        }
        print(
            f"  rectifier {name:24s} {statistics.median(ts) * 1e3:9.1f} ms (first call {first:.1f} s)",
            flush=True,
        )
    e = out["eager fp32"]["fwd_bwd_s_median"]
    for v in out.values():
        v["speedup_vs_eager_fp32"] = e / v["fwd_bwd_s_median"]
    return out


# ------------------------------------------------------------------------------------------ reporting
def hardware(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    name = platform.processor() or platform.machine()
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                name = line.split(":", 1)[1].strip()
                break
    return f"{name}, {os.cpu_count()} cores"


def shapes_for(args) -> dict[str, Shape]:
    if args.scale == "cpu":
        return {k: Shape(v.G, v.K, v.d, args.cpu_width, v.L, v.B) for k, v in CPU.items()}
    if args.scale == "cpu-published":  # the CPU codebooks and batches with the published rectifier widths
        return {k: Shape(v.G, v.K, v.d, FULL[k].W, v.L, v.B) for k, v in CPU.items()}
    return {"full": FULL, "quick": QUICK}[args.scale]


def print_tables(results: dict, meta: dict) -> None:
    hw = meta["hardware_label"]
    cpu = meta["device"] == "cpu"
    print(f"\nTraining step, {meta['device']} ({hw}), {meta['threads']} thread(s), scale {meta['scale']}")
    hdr = f"{'config':8s} {'method':18s} {'ms/step':>9s} {'steps/s':>8s} {'x ref':>6s}"
    if cpu:
        hdr += f" {'cpu ms':>8s} {'x ref':>6s}"
    hdr += f" {'peak MB':>8s} {'100 ep (h)':>10s}"
    for cfg_name, r in results.items():
        print(f"\n{cfg_name}: {r['shape_text']}")
        print(hdr)
        for n, m in r["methods"].items():
            mem = r.get("memory", {}).get(n, {})
            peak = mem.get("peak_extra_mb")
            peak_s = f"{peak:8.0f}" if isinstance(peak, (int, float)) else f"{'-':>8s}"
            row = (
                f"{cfg_name:8s} {n:18s} {m['step_s_median'] * 1e3:9.1f} {m['steps_per_s']:8.3f} "
                f"{m['ratio_vs_ref']:6.2f}"
            )
            if cpu:
                row += f" {m['cpu_s_median'] * 1e3:8.1f} {m['ratio_vs_ref_cpu_time']:6.2f}"
            print(f"{row} {peak_s} {m['projected_hours_500k_steps']:10.1f}")
        for key, what in (("phases_s_median", "wall"), ("phases_cpu_s_median", "cpu")):
            if what == "cpu" and not cpu:
                continue
            print(
                f"  phases ({what} ms, median): {'':4s}"
                + " ".join(f"{p:>10s}" for p in PHASES)
                + "       sum"
            )
            for n, m in r["methods"].items():
                ph = m[key]
                cells = " ".join(f"{ph.get(p, float('nan')) * 1e3:10.1f}" for p in PHASES)
                print(f"  {n:30s}{cells} {sum(ph.values()) * 1e3:9.1f}")
        for n, c in r["check"].items():
            print(
                f"  check {n}: ids equal ref {c['ids_equal_ref']}, after step 1 max |diff| codebook "
                f"{c['codebook_max_abs_diff']:.1e} rectifier {c['rectifier_max_abs_diff']:.1e}"
            )
    mem_kind = "RSS high-water, own subprocess" if cpu else "max_memory_allocated"
    print(
        f"\nx ref = median of per-repeat ratios to ref; cpu ms = process CPU time per step (all threads); "
        f"peak MB = memory above the pre-step level during {meta['mem_steps']} steps ({mem_kind}); "
        f"100 ep = {PROJECT_STEPS:,} steps at the median wall time, on {hw}, at the shape shown."
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--device", default="cpu")
    ap.add_argument(
        "--scale",
        choices=["full", "cpu", "cpu-published", "quick"],
        default=None,
        help="default: cpu on CPU, else full; cpu-published: CPU K and batch, published rectifier widths",
    )
    ap.add_argument("--configs", nargs="+", default=list(FULL), choices=list(FULL))
    ap.add_argument(
        "--cpu-width", type=int, default=64, help="rectifier width at --scale cpu (multiple of 32)"
    )
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=5, help="interleaved repeats (median reported)")
    ap.add_argument("--steps", type=int, default=2, help="steps per method per repeat")
    ap.add_argument("--phase-repeats", type=int, default=3)
    ap.add_argument("--batches", type=int, default=4, help="distinct batches cycled through")
    ap.add_argument("--mem-steps", type=int, default=2)
    ap.add_argument("--no-memory", action="store_true", help="skip the per-method memory subprocesses")
    ap.add_argument(
        "--compile", action="store_true", help="add torch.compile of the rectifier (slow to compile on CPU)"
    )
    ap.add_argument(
        "--bf16", action=argparse.BooleanOptionalAction, default=None, help="default: on for CUDA"
    )
    ap.add_argument(
        "--variants", action=argparse.BooleanOptionalAction, default=True, help="rectifier variants table"
    )
    ap.add_argument("--variant-bf16", action=argparse.BooleanOptionalAction, default=True)
    ap.add_argument("--variant-repeats", type=int, default=3)
    ap.add_argument("--child-timeout", type=int, default=1800)
    ap.add_argument("--quick", action="store_true", help="tiny shapes, 2 repeats: a smoke run")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "train_step.json"))
    ap.add_argument("--_child", nargs=2, metavar=("CONFIG", "METHOD"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    device = torch.device(args.device)
    if args.scale is None:
        args.scale = "quick" if args.quick else ("cpu" if device.type == "cpu" else "full")
    if args.bf16 is None:
        args.bf16 = device.type == "cuda"
    if args.quick:
        args.repeats, args.phase_repeats, args.variant_repeats = 2, 1, 1
    torch.set_num_threads(args.threads)

    if args._child:
        print(json.dumps(child_memory(args._child[0], args._child[1], args)), flush=True)
        return

    try:
        import triton  # noqa: F401

        triton_ok = device.type == "cuda"
    except ImportError:
        triton_ok = False
    meta = {
        "command": "python " + " ".join([os.path.relpath(__file__, ROOT)] + sys.argv[1:]),
        "device": device.type,
        "hardware_label": hardware(device),
        "threads": args.threads,
        "scale": args.scale,
        "cpu_width": args.cpu_width if args.scale == "cpu" else None,
        "torch": torch.__version__,
        "python": platform.python_version(),
        "triton_used": bool(triton_ok and args.compile),
        "loadavg_start": os.getloadavg(),
        "date": time.strftime("%Y-%m-%d %H:%M:%S"),
        "repeats": args.repeats,
        "steps_per_repeat": args.steps,
        "mem_steps": args.mem_steps,
        "projection": f"{PROJECT_STEPS:,} steps (100 epochs x 5,000 steps of 256 latents; ImageNet has "
        f"{EPOCH_STEPS:,} full batches an epoch) at the measured median step time",
        "gpu_numbers_taken": device.type == "cuda",
    }
    print(
        f"{meta['hardware_label']}, torch {torch.__version__}, {args.threads} thread(s), "
        f"load {meta['loadavg_start']}"
    )
    shapes = shapes_for(args)
    results: dict = {}
    for cfg_name in args.configs:
        shape = shapes[cfg_name]
        print(f"\n== {cfg_name} ({args.scale}): {shape.describe()}", flush=True)
        r = measure_config(cfg_name, shape, args, device)
        if not args.no_memory:
            r["memory"] = {}
            for n in method_names(args):
                r["memory"][n] = measure_memory(cfg_name, n, args)
                print(f"  memory {n}: {r['memory'][n]}", flush=True)
        if args.variants and cfg_name == args.configs[0]:
            r["rectifier_variants"] = rectifier_variants(shape, args, device)
        results[cfg_name] = r
    meta["loadavg_end"] = os.getloadavg()
    print_tables(results, meta)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"meta": meta, "results": results}, indent=1))
    print(f"\nwrote {out}")


if __name__ == "__main__":
    main()
