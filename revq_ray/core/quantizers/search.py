"""Memory-bounded nearest-code search over per-group codebooks.

The reference ReVQ search calls ``torch.cdist`` on two groups at a time and keeps the full (B, K) distance
matrix of each: at K = 262,144 and B = 256 that is 268 MB per group, and the matrix is written, clamped,
square-rooted and read again before ``min``. Here the search is chunked over groups, batch rows AND codes,
so the peak extra memory is bounded by ``budget_mb`` whatever K is (and, single-threaded on CPU, each chunk
stays in cache).

Algorithm, per chunk of (groups, rows, codes):

1. ``scores = ||c||^2 - 2 z.c`` with one ``torch.baddbmm`` into a reused scratch buffer (``||z||^2`` is
   the same for every code of a row, so it cannot change the argmin and is left out).
2. ``amin`` over blocks of ``block`` consecutive codes, written into a (rows, K / block) table of block
   minima. PyTorch's CPU ``argmin`` is a scalar loop (about 20x slower than the vectorized ``amin``), so
   the hot loop never searches for an index.

After the code loop, ``argmin`` over the block minima (K / block values per row) gives each row's winning
block (the first one on ties), and only that block's ``block`` codes are re-scored with the exact formula
(``||z - c||^2`` computed directly); the first minimum wins and its distance is returned. Ties therefore
resolve to the lowest index, like ``torch.argmin`` on the full matrix.

Everything here runs under ``torch.no_grad``: ids are discrete and the returned distances are detached.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch

from revq_ray.core.precision import full_precision

MB = 1 << 20
DEFAULT_BLOCK = 64
# Score-chunk size on CPU with ONE intra-op thread. Measured on a 2-core AMD EPYC (512 KiB L2 per core,
# 32 MiB L3), CPU time per distance at the three published shapes: 256 KiB 2.9/1.9/2.7 ns, 512 KiB
# 1.5/1.6/1.7, 2 MiB 1.7/1.2/1.5, 8-128 MiB about 3.6 (small chunks pay Python overhead per chunk; large
# ones fall out of cache before amin reads them). With several threads every op is an OpenMP fork/join, and
# on shared cores a small chunk's join waits for a descheduled thread: 2 threads at 2 MiB chunks cost
# 37 ns/distance of CPU time against 5.9 at 128 MiB. So multi-threaded CPU (and GPU) use the largest chunk
# the budget allows.
CPU_CHUNK_BYTES_SINGLE_THREAD = 2 * MB

ExactFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
"""(rows (r, e), candidates (r, n, e)) -> values to minimize (r, n), computed exactly (no expansion)."""


@dataclass(frozen=True)
class SearchPlan:
    """How :func:`nearest_code` cuts its work. ``peak_bytes`` is the estimated peak of extra memory."""

    group_chunk: int
    batch_chunk: int
    code_chunk: int
    """Codes scored per step; a multiple of ``block``."""
    block: int
    """Codes per block: the hot loop only finds the best block; the final pass searches inside it."""
    final_rows: int
    """Rows (group, token pairs) re-scored at once in the final exact pass."""
    bias_per_chunk: bool
    """Compute ||c||^2 per code chunk (memory independent of K) instead of once per group chunk (faster)."""
    peak_bytes: int


def _ceil_to(x: int, m: int) -> int:
    return -(-x // m) * m


def estimate_peak_bytes(
    *,
    batch: int,
    groups: int,
    codes: int,
    dim: int,
    group_chunk: int,
    batch_chunk: int,
    code_chunk: int,
    block: int,
    final_rows: int,
    bias_per_chunk: bool = False,
    elem_bytes: int = 4,
    key_dim: int | None = None,
) -> int:
    """Upper estimate of the extra bytes :func:`nearest_code` holds at once for a given chunking.

    Counts every temporary of the hot loop (scores, block minima, the ||c||^2 bias, padded or dtype-cast
    copies of the code chunk, a copy of the row chunk, the best block per row) and of the final exact pass
    (gathered candidate codes, their differences, values and indices). Inputs and the (B, G) outputs are
    not counted: they exist whatever the search does.
    """
    es = elem_bytes
    e = dim
    ey = key_dim if key_dim is not None else dim
    gc, bc, kc = group_chunk, batch_chunk, code_chunk
    k_pad = _ceil_to(codes, block)
    rows = gc * bc
    block_minima = rows * (k_pad // block) * es  # one value per code block, for every row
    bias = gc * (kc if bias_per_chunk else k_pad) * es
    hot = (
        rows * kc * es  # scores scratch
        + 2 * gc * kc * ey * es  # code chunk copies (padding / dtype cast / square for the bias)
        + 2 * gc * kc * es  # bias chunk temporary
        + rows * e * es  # row chunk copy (transpose / dtype cast)
        + rows * 8  # best block per row
    )
    fr = final_rows
    final = (
        fr * block * (2 * ey * es + es + 2 * 8 + 1)  # candidates, diff, values, gather index, mask
        + fr * (e * es + 3 * (es + 8))  # row copies, winners
        + 2 * rows * (es + 8)  # per-chunk id/value staging
        + rows * 8  # best block per row
    )
    # The block minima and the bias are alive through both phases.
    return block_minima + bias + max(hot, final)


# "auto" search budget (model.quantizer.search_budget_mb = 0): a fixed size on CPU, where the search is
# compute-bound and cache-sized chunks win anyway; on a GPU a share of the free memory measured at the first
# search, so that at 256T-L (G=256, K=262,144) the search runs in a few large chunks instead of one group
# at a time (256 Python iterations per forward at the old fixed 256 MB).
CPU_AUTO_BUDGET_MB = 256.0
GPU_AUTO_FRACTION = 0.25
GPU_AUTO_MAX_MB = 16384.0
_auto_budget_cache: dict[str, float] = {}


def resolve_budget_mb(budget_mb: float, device: torch.device | str = "cpu") -> float:
    """``budget_mb`` if > 0; else (auto) 256 MB on CPU, or a quarter of the GPU's free memory at the first
    call for that device (between 256 MB and 16 GiB), cached so every later search plans the same way."""
    if budget_mb > 0:
        return float(budget_mb)
    if budget_mb < 0:
        raise ValueError(
            f"search budget_mb={budget_mb} must be > 0, or 0 for auto (model.quantizer.search_budget_mb)"
        )
    dev = torch.device(device)
    if dev.type != "cuda":
        return CPU_AUTO_BUDGET_MB
    key = str(dev if dev.index is not None else torch.device("cuda", torch.cuda.current_device()))
    if key not in _auto_budget_cache:
        free, _total = torch.cuda.mem_get_info(torch.device(key))
        mb = GPU_AUTO_FRACTION * free / MB
        _auto_budget_cache[key] = float(min(GPU_AUTO_MAX_MB, max(CPU_AUTO_BUDGET_MB, mb)))
    return _auto_budget_cache[key]


def plan_search(
    batch: int,
    groups: int,
    codes: int,
    dim: int,
    *,
    budget_mb: float = 256.0,
    elem_bytes: int = 4,
    device: torch.device | str = "cpu",
    target_chunk_bytes: int | None = None,
    block: int = DEFAULT_BLOCK,
    key_dim: int | None = None,
) -> SearchPlan:
    """Choose chunk sizes for a (batch, groups) x (groups, codes, dim) search within ``budget_mb``.

    ``target_chunk_bytes`` is the preferred size of one score chunk: cache-sized on a single-threaded CPU,
    otherwise as large as the budget allows (see ``CPU_CHUNK_BYTES_SINGLE_THREAD``). ``budget_mb`` is a hard
    cap on :func:`estimate_peak_bytes`.
    """
    budget_mb = resolve_budget_mb(budget_mb, device)
    if min(batch, groups, codes, dim) < 1:
        raise ValueError(f"empty search: batch={batch}, groups={groups}, codes={codes}, dim={dim}")
    budget = int(budget_mb * MB)
    if target_chunk_bytes is None:
        single_cpu = torch.device(device).type == "cpu" and torch.get_num_threads() == 1
        target_chunk_bytes = CPU_CHUNK_BYTES_SINGLE_THREAD if single_cpu else budget
    es = elem_bytes

    def peak(gc: int, bc: int, kc: int, blk: int, fr: int, per_chunk: bool) -> int:
        return estimate_peak_bytes(
            batch=batch, groups=groups, codes=codes, dim=dim, group_chunk=gc, batch_chunk=bc, code_chunk=kc,
            block=blk, final_rows=fr, bias_per_chunk=per_chunk, elem_bytes=es, key_dim=key_dim,
        )  # fmt: skip

    def fit(blk: int, per_chunk: bool) -> SearchPlan | None:
        # Score elements per chunk: the target, but at most half the budget (the rest covers the block
        # minima, bias, copies counted by estimate_peak_bytes).
        elems = max(1, min(target_chunk_bytes, budget // 2) // es)
        kc = min(_ceil_to(codes, blk), max(blk, (elems // min(batch, 256)) // blk * blk))
        bc = min(batch, max(1, elems // kc))
        gc = min(groups, max(1, elems // (bc * kc)))
        fr = min(gc * bc, max(1, elems // blk))
        # Shrink until the estimate fits: rows of the final pass, then groups, rows, codes.
        while peak(gc, bc, kc, blk, fr, per_chunk) > budget:
            if fr > 1 and peak(gc, bc, kc, blk, 1, per_chunk) <= budget:
                fr = max(1, fr // 2)
            elif gc > 1:
                gc = max(1, gc // 2)
            elif bc > 1:
                bc = max(1, bc // 2)
            elif kc > blk:
                kc = max(blk, (kc // 2) // blk * blk)
            else:
                return None
        fr = min(fr, gc * bc)
        return SearchPlan(gc, bc, kc, blk, fr, per_chunk, peak(gc, bc, kc, blk, fr, per_chunk))

    # Preferred block first; larger blocks shrink the per-row block minima (large K, small budget), smaller
    # ones shrink the final pass (small K, tiny budget).
    blk0 = max(1, min(block, codes))
    blocks = [blk0]
    while blocks[-1] < codes:
        blocks.append(blocks[-1] * 2)
    b = blk0
    while b > 1:
        b //= 2
        blocks.append(b)
    for blk in blocks:
        for per_chunk in (False, True):
            plan = fit(min(blk, codes), per_chunk)
            if plan is not None:
                return plan
    raise ValueError(
        f"search budget_mb={budget_mb} is too small for codebook_size={codes}, dim={dim}; "
        "raise model.quantizer.search_budget_mb"
    )


def _compute_dtype(*tensors: torch.Tensor) -> torch.dtype:
    # Half precision is not accurate enough to rank distances: search in float32 at least.
    dt = torch.float32
    for t in tensors:
        dt = torch.promote_types(dt, t.dtype)
    return dt


def _bias(y_gke: torch.Tensor, sqnorm: bool, dt: torch.dtype, ones_e1: torch.Tensor) -> torch.Tensor:
    if not sqnorm:
        return torch.zeros(y_gke.shape[:2], dtype=dt, device=y_gke.device)
    # A matmul with ones: a sum over a last dim of 4-8 is a slow scalar reduction on CPU (3x slower).
    return torch.matmul(y_gke.to(dt).square(), ones_e1).squeeze(-1)


def _sq_dist(rows_re: torch.Tensor, cand_rne: torch.Tensor) -> torch.Tensor:
    diff = rows_re.unsqueeze(1) - cand_rne
    # Sum over the last (tiny) dim as a matmul with ones: 3x faster than .sum(-1) on CPU.
    return torch.matmul(diff.square_(), diff.new_ones(diff.shape[-1], 1)).squeeze(-1)


@torch.no_grad()
def chunked_argmin(
    x_gbe: torch.Tensor,
    y_gke: torch.Tensor,
    *,
    alpha: float,
    sqnorm_bias: bool,
    exact_fn: ExactFn,
    plan: SearchPlan,
    x_exact_gbe: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """argmin over k of ``bias[g, k] + alpha * x[g, b] . y[g, k]`` for every (g, b), chunked by ``plan``.

    ``bias`` is ``||y[g, k]||^2`` when ``sqnorm_bias`` else 0. The winner is then re-scored inside its block
    with ``exact_fn`` (which must rank like the expanded score). Returns ``(ids_gb, exact_value_gb)``.
    ``x_exact_gbe`` optionally gives the rows ``exact_fn`` takes, when they differ from the matmul's
    (GQ scores with the posterior's mean and precision, not the folded features).
    """
    # Autocast would run the baddbmm in bf16 and pick other codes: the search is fp32, always.
    with full_precision(x_gbe.device):
        return _chunked_argmin(x_gbe, y_gke, alpha, sqnorm_bias, exact_fn, plan, x_exact_gbe)


def _chunked_argmin(
    x_gbe: torch.Tensor,
    y_gke: torch.Tensor,
    alpha: float,
    sqnorm_bias: bool,
    exact_fn: ExactFn,
    plan: SearchPlan,
    x_exact_gbe: torch.Tensor | None,
) -> tuple[torch.Tensor, torch.Tensor]:
    G, B, e = x_gbe.shape
    K = y_gke.shape[1]
    if y_gke.shape[0] != G:
        raise ValueError(f"x has {G} groups but y has {y_gke.shape[0]}")
    dev = x_gbe.device
    dt = _compute_dtype(x_gbe, y_gke)
    gc, bc, kc, blk, fr = plan.group_chunk, plan.batch_chunk, plan.code_chunk, plan.block, plan.final_rows
    k_pad = _ceil_to(K, blk)
    n_blocks = k_pad // blk
    ids_gb = torch.empty(G, B, dtype=torch.long, device=dev)
    val_gb = torch.empty(G, B, dtype=dt, device=dev)
    # Scratch reused by every chunk: on CPU a fresh multi-MB allocation per chunk is an mmap plus page
    # faults, which costs as much as the arithmetic.
    scores = torch.empty(gc * bc * kc, dtype=dt, device=dev)
    block_min = torch.empty(gc * bc * n_blocks, dtype=dt, device=dev)
    y_flat = y_gke.reshape(G * K, -1)
    arange_blk = torch.arange(blk, device=dev)
    ones_e1 = torch.ones(y_gke.shape[-1], 1, dtype=dt, device=dev)
    for g0 in range(0, G, gc):
        g1 = min(G, g0 + gc)
        ng = g1 - g0
        if not plan.bias_per_chunk:
            # Per-code bias for the whole group chunk, padded to whole blocks with +inf (padded codes never
            # win). Built in chunks (a (ng, K, d) temporary would grow with K).
            bias_all = torch.full((ng, k_pad), math.inf, dtype=dt, device=dev)
            kb = 2 * kc
            for k0 in range(0, K, kb):
                k1 = min(K, k0 + kb)
                bias_all[:, k0:k1] = _bias(y_gke[g0:g1, k0:k1], sqnorm_bias, dt, ones_e1)
        for b0 in range(0, B, bc):
            b1 = min(B, b0 + bc)
            nr = b1 - b0
            x = x_gbe[g0:g1, b0:b1].to(dt)
            bm = block_min[: ng * nr * n_blocks].view(ng, nr, n_blocks)
            for k0 in range(0, k_pad, kc):
                k1 = min(k_pad, k0 + kc)
                y = y_gke[g0:g1, k0:k1].to(dt)
                if plan.bias_per_chunk:
                    bias = _bias(y, sqnorm_bias, dt, ones_e1)
                    if k1 > K:
                        bias = torch.cat([bias, bias.new_full((ng, k1 - K), math.inf)], 1)
                else:
                    bias = bias_all[:, k0:k1]
                if k1 > K:  # the last chunk: pad to whole blocks (zero codes, +inf bias)
                    y = torch.cat([y, y.new_zeros(ng, k1 - K, y.shape[-1])], 1)
                s = scores[: ng * nr * (k1 - k0)].view(ng, nr, k1 - k0)
                torch.baddbmm(bias[:, None, :], x, y.transpose(1, 2), alpha=alpha, out=s)
                torch.amin(s.view(ng, nr, -1, blk), dim=-1, out=bm[:, :, k0 // blk : k1 // blk])
            # First minimum over all blocks -> lowest block index on ties.
            best_blk = bm.argmin(dim=-1)
            _final_pass(
                x_gbe if x_exact_gbe is None else x_exact_gbe,
                y_flat, best_blk, g0, b0, K, blk, fr, arange_blk, exact_fn, dt, ids_gb, val_gb,
            )  # fmt: skip
    return ids_gb, val_gb


def _final_pass(
    x_gbe: torch.Tensor,
    y_flat: torch.Tensor,
    best_blk: torch.Tensor,
    g0: int,
    b0: int,
    K: int,
    blk: int,
    fr: int,
    arange_blk: torch.Tensor,
    exact_fn: ExactFn,
    dt: torch.dtype,
    ids_gb: torch.Tensor,
    val_gb: torch.Tensor,
) -> None:
    """Re-score the ``blk`` codes of each row's winning block exactly and keep the first minimum."""
    ng, nr = best_blk.shape
    dev = best_blk.device
    g_idx = torch.arange(g0, g0 + ng, device=dev).repeat_interleave(nr)  # (ng*nr,) group of each row
    b_idx = torch.arange(b0, b0 + nr, device=dev).repeat(ng)
    blk_flat = best_blk.reshape(-1)
    out_ids = ids_gb[g0 : g0 + ng, b0 : b0 + nr]
    out_val = val_gb[g0 : g0 + ng, b0 : b0 + nr]
    ids_flat = torch.empty(ng * nr, dtype=torch.long, device=dev)
    val_flat = torch.empty(ng * nr, dtype=dt, device=dev)
    for r0 in range(0, ng * nr, fr):
        r1 = min(ng * nr, r0 + fr)
        g = g_idx[r0:r1]
        rows = x_gbe[g, b_idx[r0:r1]].to(dt)
        k = blk_flat[r0:r1, None] * blk + arange_blk  # (r, blk) candidate code ids
        valid = k < K
        cand = y_flat[(g[:, None] * K + k.clamp_max(K - 1))].to(dt)
        values = exact_fn(rows, cand).masked_fill_(~valid, math.inf)
        v, j = values.min(dim=-1)  # first minimum -> lowest index on ties
        ids_flat[r0:r1] = blk_flat[r0:r1] * blk + j
        val_flat[r0:r1] = v
    out_ids.copy_(ids_flat.view(ng, nr))
    out_val.copy_(val_flat.view(ng, nr))


@torch.no_grad()
def nearest_code(
    tokens_btd: torch.Tensor,
    codebook_gkd: torch.Tensor,
    budget_mb: float = 256.0,
    *,
    target_chunk_bytes: int | None = None,
    block: int = DEFAULT_BLOCK,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Nearest code (squared Euclidean) of each token in its own group's codebook.

    Args:
        tokens_btd: (B, G, d) tokens; token t of every sample searches only ``codebook_gkd[t]``.
        codebook_gkd: (G, K, d) codebooks.
        budget_mb: hard cap on the extra memory of the search (see :func:`plan_search`); 0 = auto
            (:func:`resolve_budget_mb`).
        target_chunk_bytes: preferred score-chunk size (default: cache-sized on a single-threaded CPU,
            else the largest the budget allows).
        block: codes per block of the two-level min (tuning knob; results do not depend on it).

    Returns:
        ``(ids_bt, dist_bt)``: int64 code ids in [0, K) and the squared distance to that code (computed
        directly as ``||z - c||^2``, in float32 or wider). Ties go to the lowest index.
    """
    if tokens_btd.dim() != 3 or codebook_gkd.dim() != 3:
        raise ValueError(
            f"expected tokens (B, G, d) and codebook (G, K, d), got {tuple(tokens_btd.shape)} and "
            f"{tuple(codebook_gkd.shape)}"
        )
    B, G, d = tokens_btd.shape
    if codebook_gkd.shape[0] != G or codebook_gkd.shape[2] != d:
        raise ValueError(
            f"tokens (B={B}, G={G}, d={d}) do not match codebook {tuple(codebook_gkd.shape)}: "
            "need one codebook per token position and the same code dim"
        )
    if codebook_gkd.device != tokens_btd.device:
        raise ValueError(f"tokens on {tokens_btd.device} but codebook on {codebook_gkd.device}")
    K = codebook_gkd.shape[1]
    dt = _compute_dtype(tokens_btd, codebook_gkd)
    plan = plan_search(
        B, G, K, d, budget_mb=budget_mb, elem_bytes=torch.finfo(dt).bits // 8, device=tokens_btd.device,
        target_chunk_bytes=target_chunk_bytes, block=block,
    )  # fmt: skip
    ids_gb, dist_gb = chunked_argmin(
        tokens_btd.detach().transpose(0, 1),
        codebook_gkd.detach(),
        alpha=-2.0,
        sqnorm_bias=True,
        exact_fn=_sq_dist,
        plan=plan,
    )
    return ids_gb.t().contiguous(), dist_gb.t().contiguous()
