"""ReVQ's multi-group vector quantizer (and plain VQ): one codebook per token position, non-activation reset.

Parameters ``codebook`` (G, K, d); buffer ``counts`` (G, K) int64 = hits per code since the last reset,
counted in training mode only (evaluation passes never touch it).

Losses (METHODS.md section 1):

* ``loss="decoupled"`` (the reference default): ``{"quant": MSE(q, sg(z))}`` - an online k-means whose
  gradient reaches only the codebook through the gather. The quantized output is ``q`` itself (no
  straight-through); the model feeds ``q.detach()`` to the rectifier.
* ``loss="joint"``: the output is straight-through (value ``q``, gradient to ``z``) and
  ``{"commit": beta * MSE(z, sg(q)) + MSE(q, sg(z))}``. With revq-ray's frozen latents ``z`` has no
  gradient, so the codebook learns from the second term only (as in the decoupled form) and the output is
  just ``sg(q)``; the paper's joint objective (the rectifier's loss reaching the codebook through ``q``) is
  obtained instead by feeding the decoupled output ``q``, which carries the codebook gradient, to the
  rectifier without detaching it.

Resets are deterministic given a ``torch.Generator`` and the global counts, so every data-parallel rank
that passes an identically seeded generator produces a bit-identical codebook.
"""

from __future__ import annotations

import logging
import math
import time
import warnings
from dataclasses import field, make_dataclass
from typing import Any

import torch
import torch.nn.functional as F

from revq_ray.core.precision import as_fp32, full_precision
from revq_ray.core.quantizers.base import (
    Quantizer,
    QuantOut,
    ReduceFn,
    ResetReport,
    accumulate_counts,
    no_reduce,
    straight_through,
    usage_from_counts,
)
from revq_ray.core.quantizers.search import MB, nearest_code, resolve_budget_mb
from revq_ray.specs import RESET

log = logging.getLogger(__name__)


def check_tokens(tokens_btd: torch.Tensor, groups: int, dim: int, what: str = "tokens_btd") -> None:
    if tokens_btd.dim() != 3 or tokens_btd.shape[1] != groups or tokens_btd.shape[2] != dim:
        raise ValueError(
            f"{what} has shape {tuple(tokens_btd.shape)}; expected (B, {groups}, {dim}) = "
            f"(batch, model.quantizer.tokens, token dim)"
        )


def check_ids(ids_bt: torch.Tensor, groups: int, codebook_size: int) -> None:
    if ids_bt.dim() != 2 or ids_bt.shape[1] != groups:
        raise ValueError(f"ids_bt has shape {tuple(ids_bt.shape)}; expected (B, {groups})")
    if ids_bt.dtype.is_floating_point or ids_bt.dtype == torch.bool:
        raise ValueError(f"ids_bt must be an integer tensor, got {ids_bt.dtype}")
    # Ids are flattened with a per-group offset, so an out-of-range id would silently read the next
    # group's code: check explicitly (a host sync on GPU; codes() is a decode path, not the training loop).
    if ids_bt.numel() and (int(ids_bt.min()) < 0 or int(ids_bt.max()) >= codebook_size):
        raise ValueError(
            f"ids_bt values must lie in [0, {codebook_size}), got [{int(ids_bt.min())}, {int(ids_bt.max())}]"
        )


class _SparseGather(torch.autograd.Function):
    """``out[b, g] = codebook[g, ids[b, g]]``; the codebook gradient is a sparse COO tensor of the looked-up
    rows (sparse dims (g, k), dense dim d, duplicates not yet summed), not a dense (G, K, d) tensor."""

    @staticmethod
    def forward(ctx, codebook_gkd: torch.Tensor, ids_bt: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        G, K, d = codebook_gkd.shape
        offsets = torch.arange(G, device=ids_bt.device, dtype=torch.long) * K
        flat = (ids_bt.long() + offsets).reshape(-1)
        ctx.save_for_backward(ids_bt)
        ctx.shape = (G, K, d)
        return codebook_gkd.reshape(G * K, d).index_select(0, flat).view(*ids_bt.shape, d)

    @staticmethod
    def backward(ctx, grad_btd: torch.Tensor):  # type: ignore[override]
        (ids_bt,) = ctx.saved_tensors
        G, K, d = ctx.shape
        # Group of every row of grad_btd.reshape(-1, d): (B*G,), b-major.
        g_idx = torch.arange(G, device=ids_bt.device, dtype=torch.long).repeat(ids_bt.shape[0])
        indices = torch.stack([g_idx, ids_bt.reshape(-1).long()])
        # Indices are in range by construction (ids come from the search): no invariant check (it would also
        # sync on GPU). Checks are off by default; saying so explicitly (a no-op) stops torch's warning.
        if not torch.sparse.check_sparse_tensor_invariants.is_enabled():
            torch.sparse.check_sparse_tensor_invariants.disable()
        grad = torch.sparse_coo_tensor(
            indices, grad_btd.reshape(-1, d), (G, K, d), is_coalesced=False, check_invariants=False
        )
        return grad, None


def gather_codes(codebook_gkd: torch.Tensor, ids_bt: torch.Tensor, sparse: bool = False) -> torch.Tensor:
    """``out[b, g] = codebook[g, ids[b, g]]`` as one embedding lookup (gradient flows into the codebook).

    ``sparse=True``: same values, but the codebook's gradient is a sparse COO tensor holding only the B * G
    looked-up rows (for :class:`revq_ray.core.optim.RowSparseAdamW`); default: a dense (G, K, d) gradient.
    """
    if sparse and codebook_gkd.requires_grad and torch.is_grad_enabled():
        return _SparseGather.apply(codebook_gkd, ids_bt)
    G, K, d = codebook_gkd.shape
    offsets = torch.arange(G, device=ids_bt.device, dtype=torch.long) * K
    return F.embedding(ids_bt.long() + offsets, codebook_gkd.reshape(G * K, d))


class CountsMixin:
    """Hit counts (G, K) since the last reset, and the usage statistics computed from them."""

    counts: torch.Tensor
    reduce_fn: ReduceFn

    def _register_counts(self, groups: int, codebook_size: int) -> None:
        # int64: exact, and DeepSpeed's bf16/fp16 casts leave integer buffers alone. Persistent so that a
        # resumed run resets on the same counts as an uninterrupted one.
        self.register_buffer("counts", torch.zeros(groups, codebook_size, dtype=torch.long))  # type: ignore[attr-defined]

    def _count(self, ids_bt: torch.Tensor) -> None:
        if self.training:  # type: ignore[attr-defined]
            accumulate_counts(self.counts, ids_bt)

    def usage_stats(self, reduce: bool = False, dead_threshold: int = 1) -> dict[str, torch.Tensor]:
        """Per-group ``usage``, ``perplexity``, ``dead`` and ``hits`` (each shape (G,)) since the last reset.

        Local counts by default. ``reduce=True`` sums a copy across ranks with ``reduce_fn`` first; it is a
        collective, so every rank must call it (calling it on rank 0 only hangs the job).
        """
        counts = self.counts.clone()
        if reduce:
            counts = self.reduce_fn(counts)
        return usage_from_counts(counts, dead_threshold)

    @torch.no_grad()
    def reset_counts(self) -> None:
        self.counts.zero_()


def _check_reset(self: Any) -> None:
    problems = [p for name, spec in RESET.items() if (p := spec.problem(name, getattr(self, name)))]
    if problems:
        raise ValueError("reset: " + "; ".join(problems))


ResetParams = make_dataclass(
    "ResetParams",
    [(name, spec.type, field(default=spec.default)) for name, spec in RESET.items()],
    frozen=True,
    namespace={"__post_init__": _check_reset},
)
ResetParams.__module__ = __name__
ResetParams.__doc__ = """What a non-activation reset of :class:`GroupedVQ` does (the caller decides *when* it
runs): ``enabled``, ``dead_threshold`` (a code with fewer hits since the last reset is dead), ``ratio`` (at
most this fraction of a group's codes at once), ``noise`` (std added to copied codes). Built from
:data:`revq_ray.specs.RESET`, as ``revq_ray.config.ResetConfig`` is: names, defaults and bounds are written
once."""


class GroupedVQ(CountsMixin, Quantizer):
    """G codebooks of K codes of dim d; each token takes the nearest code of its own group (ReVQ / VQ).

    Args:
        tokens: G, the number of tokens (= groups) per latent.
        dim: d, the token dimension.
        codebook_size: K, codes per group.
        loss: ``"decoupled"`` (reference) or ``"joint"`` (straight-through + commitment), see module doc.
        beta: commitment weight of the joint loss.
        init: what :meth:`init_from_tokens` does: ``"sample"`` (K distinct tokens per group, without
            replacement), ``"kmeans++"`` (k-means++ seeding, then ``kmeans_iters`` Lloyd steps) or
            ``"random"`` (normal with the tokens' per-group mean and std).
        reset_cfg: non-activation reset settings, :class:`ResetParams` (the caller decides *when* to call
            :meth:`maybe_reset`).
        search_budget_mb: peak extra memory of the nearest-code search.
        reduce_fn: sums a tensor across ranks in place (resets use the global counts).
    """

    sparse_grad: bool = False
    """Training speed switch (off by default): the codebook's gradient is a sparse COO tensor of the rows
    looked up this step instead of a dense (G, K, d) tensor. Needs an optimizer that accepts sparse gradients
    (:class:`revq_ray.core.optim.RowSparseAdamW`); values and losses are unchanged."""

    def __init__(
        self,
        tokens: int,
        dim: int,
        codebook_size: int,
        *,
        loss: str = "decoupled",
        beta: float = 0.25,
        init: str = "sample",
        kmeans_iters: int = 0,
        reset_cfg: ResetParams | None = None,
        search_budget_mb: float = 256.0,
        reduce_fn: ReduceFn = no_reduce,
    ):
        super().__init__(reduce_fn)
        if loss not in ("decoupled", "joint"):
            raise ValueError(f"model.quantizer.loss={loss!r}: expected 'decoupled' or 'joint'")
        if init not in ("sample", "kmeans++", "random"):
            raise ValueError(f"model.quantizer.init={init!r}: expected 'sample', 'kmeans++' or 'random'")
        self._set_sizes(tokens, dim, codebook_size)
        self.loss, self.beta, self.init, self.kmeans_iters = loss, beta, init, kmeans_iters
        self.reset_cfg = reset_cfg if reset_cfg is not None else ResetParams()
        self.search_budget_mb = search_budget_mb
        # Standardized latents are about N(0, 1); init_from_tokens replaces this before training.
        self.codebook = torch.nn.Parameter(torch.randn(tokens, codebook_size, dim))
        self._register_counts(tokens, codebook_size)

    def extra_repr(self) -> str:
        return (
            f"tokens={self.tokens}, dim={self.dim}, codebook_size={self.codebook_size}, loss={self.loss}, "
            f"init={self.init}, reset={self.reset_cfg.enabled}"
        )

    # ------------------------------------------------------------------------------------------ forward
    def forward(self, tokens_btd: torch.Tensor) -> QuantOut:
        """Quantize (B, G, d) tokens. Training mode also adds the hits to ``counts``."""
        check_tokens(tokens_btd, self.tokens, self.dim)
        # Search, gather and losses in fp32 with autocast off, whatever the caller runs under.
        with full_precision(tokens_btd.device):
            z = as_fp32(tokens_btd)
            ids_bt, _ = nearest_code(z.detach(), self.codebook.detach(), self.search_budget_mb)
            self._count(ids_bt)
            q = as_fp32(gather_codes(self.codebook, ids_bt, sparse=self.sparse_grad))
            z_sg = z.detach()
            if self.loss == "decoupled":
                return QuantOut(q, ids_bt, {"quant": F.mse_loss(q, z_sg)})
            commit = self.beta * F.mse_loss(z, q.detach()) + F.mse_loss(q, z_sg)
            return QuantOut(straight_through(z, q), ids_bt, {"commit": commit})

    def codes(self, ids_bt: torch.Tensor) -> torch.Tensor:
        """(B, G) ids -> (B, G, d) codes: exactly the forward's quantized output (in eval mode)."""
        check_ids(ids_bt, self.tokens, self.codebook_size)
        with full_precision(ids_bt.device):
            return as_fp32(gather_codes(self.codebook, ids_bt, sparse=self.sparse_grad))

    # --------------------------------------------------------------------------------------------- init
    @torch.no_grad()
    def init_from_tokens(self, tokens_ntd: torch.Tensor, generator: torch.Generator | None = None) -> None:
        """Fill every group's codebook from sampled training tokens (N, G, d), per ``self.init``.

        Deterministic given the tokens and the generator state, so ranks that do it with the same inputs
        agree (or do it on rank 0 and broadcast). Runs on CPU (the generator is a CPU generator). Cost:
        ``sample`` about G sorts of 2K tokens; ``kmeans++`` K sequential passes over all N tokens of every
        group (O(K N G d): minutes on CPU at K = 16,384, so meant for small K or small init sets).
        """
        check_tokens(tokens_ntd, self.tokens, self.dim, "tokens_ntd")
        x = tokens_ntd.detach().to(device="cpu", dtype=torch.float32)
        if self.init == "random":
            mean = x.mean(0)  # (G, d)
            std = x.std(0) if x.shape[0] > 1 else torch.ones_like(mean)
            noise = torch.randn(self.tokens, self.codebook_size, self.dim, generator=generator)
            cb = mean[:, None, :] + std[:, None, :] * noise
        elif self.init == "kmeans++":
            if x.shape[0] < self.codebook_size:
                warnings.warn(
                    f"kmeans++ init with {x.shape[0]} tokens < codebook_size={self.codebook_size}: some "
                    "codes will be duplicates and start dead. Raise data.init_samples.",
                    stacklevel=2,
                )
            cb = kmeans_plus_plus(x, self.codebook_size, generator, budget_mb=self.search_budget_mb)
            cb = lloyd(x, cb, self.kmeans_iters, budget_mb=self.search_budget_mb)
        else:
            rows, short, t0, last = [], {}, time.monotonic(), time.monotonic()
            for g in range(self.tokens):
                row, n_distinct = self._sample_distinct(x[:, g], generator)
                rows.append(row)
                if n_distinct < self.codebook_size:
                    short[g] = n_distinct
                if time.monotonic() - last > 10:  # progress on long inits (large G and K)
                    last = time.monotonic()
                    log.info("codebook init: %d/%d groups (%.0f s)", g + 1, self.tokens, last - t0)
            if short:
                # One warning for all groups (a per-group warning floods the log of a 512-group model).
                noise = self.reset_cfg.noise if self.reset_cfg.noise > 0 else 0.1
                worst = min(short, key=short.get)
                warnings.warn(
                    f"{len(short)} of {self.tokens} groups had fewer distinct init tokens than codebook_size="
                    f"{self.codebook_size} (fewest: {short[worst]}, in group {worst}); the rest are filled "
                    f"with noisy copies (std {noise}). Raise data.init_samples to sample more latents.",
                    stacklevel=2,
                )
            cb = torch.stack(rows)
        self.codebook.data.copy_(cb.to(self.codebook.dtype))
        self.counts.zero_()

    def _sample_distinct(
        self, x_nd: torch.Tensor, generator: torch.Generator | None
    ) -> tuple[torch.Tensor, int]:
        """K token values of one group, distinct where the data allow, drawn without replacement (duplicates
        would start dead), and how many distinct values there were (< K: the rest are noisy copies)."""
        K, N = self.codebook_size, x_nd.shape[0]
        perm = torch.randperm(N, generator=generator)
        m = min(N, 2 * K)
        while True:
            cand = x_nd[perm[:m]]
            uniq, inv = torch.unique(cand, dim=0, return_inverse=True)
            # Position (in permutation order) of the first occurrence of every distinct value.
            first = torch.full((uniq.shape[0],), m, dtype=torch.long).scatter_reduce_(
                0, inv, torch.arange(m), reduce="amin"
            )
            order = first.sort().values
            if order.numel() >= K or m == N:
                break
            m = min(N, 2 * m)
        picked = cand[order[:K]]
        n_have = picked.shape[0]
        if n_have < K:
            noise = self.reset_cfg.noise if self.reset_cfg.noise > 0 else 0.1
            src = torch.randint(n_have, (K - n_have,), generator=generator)
            extra = picked[src] + noise * torch.randn(K - n_have, self.dim, generator=generator)
            picked = torch.cat([picked, extra])
        return picked, n_have

    # -------------------------------------------------------------------------------------------- reset
    @torch.no_grad()
    def maybe_reset(self, generator: torch.Generator | None = None) -> ResetReport | None:
        """Non-activation reset with the global counts; returns the overwritten rows (or None if disabled).

        Every rank must call this together (``reduce_fn`` is a collective) with a generator in the same
        state; the outcome then is bit-identical across ranks. Per group: dead = ``counts <
        dead_threshold``; ``n = min(#dead, floor(ratio * K))``; the i-th least-used dead code (ties: lower
        index first) becomes a copy of the i-th most-used code (ties: lower index first) plus
        ``noise * N(0, 1)``. Counts are zeroed afterwards.
        """
        cfg = self.reset_cfg
        if not cfg.enabled:
            return None
        counts = self.reduce_fn(self.counts)
        if counts is not self.counts:  # a reduce_fn that returns a new tensor instead of summing in place
            self.counts.copy_(counts)
        counts = self.counts
        usage = usage_from_counts(counts, cfg.dead_threshold)  # the global counts, before they are zeroed
        G, K = counts.shape
        dev = counts.device
        cap = math.floor(cfg.ratio * K)
        n_reset = (counts < cfg.dead_threshold).sum(1).clamp_max(cap)  # (G,)
        n_max = int(n_reset.max()) if G else 0
        if n_max == 0:
            self.counts.zero_()
            empty = torch.empty(0, dtype=torch.long, device=self.codebook.device)
            return ResetReport(empty, empty.clone(), usage=usage)
        # Unique sort keys make the order (and so the result) independent of the sort algorithm:
        # ascending count then ascending index; and descending count then ascending index.
        idx = torch.arange(K, device=dev, dtype=torch.long)
        key_low = counts * K + idx
        key_high = counts * K + (K - 1 - idx)
        targets = torch.topk(key_low, n_max, dim=1, largest=False, sorted=True).indices  # least used first
        sources = torch.topk(key_high, n_max, dim=1, largest=True, sorted=True).indices  # most used first
        take = torch.arange(n_max, device=dev)[None, :] < n_reset[:, None]  # (G, n_max)
        g_idx = torch.arange(G, device=dev)[:, None].expand(G, n_max)[take]
        t_idx, s_idx = targets[take], sources[take]
        noise_dev = generator.device if generator is not None else torch.device("cpu")
        noise = torch.randn(
            t_idx.numel(), self.dim, generator=generator, device=noise_dev, dtype=torch.float32
        )
        cb = self.codebook.data
        g_cb, t_cb, s_cb = g_idx.to(cb.device), t_idx.to(cb.device), s_idx.to(cb.device)
        # Gather all sources before writing: a source may itself be a target when most codes are dead.
        new = cb[g_cb, s_cb].float() + cfg.noise * noise.to(cb.device)
        cb[g_cb, t_cb] = new.to(cb.dtype)
        self.counts.zero_()
        return ResetReport(g_cb, t_cb, usage=usage)

    def usage_stats(self, reduce: bool = False, dead_threshold: int | None = None) -> dict[str, torch.Tensor]:
        thr = self.reset_cfg.dead_threshold if dead_threshold is None else dead_threshold
        return super().usage_stats(reduce=reduce, dead_threshold=thr)


# ------------------------------------------------------------------------------------------ k-means
def _group_chunk(n: int, d: int, budget_mb: float, groups: int) -> int:
    # About four (n, d) float32 temporaries per group in flight.
    budget_mb = resolve_budget_mb(budget_mb, "cpu")
    return max(1, min(groups, int(budget_mb * MB) // max(1, 4 * n * (d + 1) * 4)))


@torch.no_grad()
def kmeans_plus_plus(
    x_ngd: torch.Tensor, k: int, generator: torch.Generator | None = None, *, budget_mb: float = 256.0
) -> torch.Tensor:
    """k-means++ seeding of every group at once: (N, G, d) tokens -> (G, k, d) centers.

    Vectorized over groups (chunked to ``budget_mb``); k sequential steps of O(N d) per group, so it suits
    init sets of up to a few times k tokens. Requires N >= k (falls back to padding with repeats if not).
    """
    N, G, d = x_ngd.shape
    if N > 2**24:
        raise ValueError(
            f"kmeans++ init over {N} tokens exceeds torch.multinomial's 2^24 limit; sample fewer"
        )
    out = torch.empty(G, k, d, dtype=torch.float32)
    gc = _group_chunk(N, d, budget_mb, G)
    for g0 in range(0, G, gc):
        g1 = min(G, g0 + gc)
        xs = x_ngd[:, g0:g1].transpose(0, 1).float().contiguous()  # (gc, N, d)
        ng = g1 - g0
        rows = torch.arange(ng)
        first = torch.randint(N, (ng,), generator=generator)
        c = xs[rows, first]  # (gc, d)
        out[g0:g1, 0] = c
        d2 = (xs - c[:, None]).square().sum(-1)  # (gc, N)
        last = time.monotonic()
        for j in range(1, k):
            if time.monotonic() - last > 10:
                last = time.monotonic()
                log.info("kmeans++ init: groups %d-%d of %d, center %d/%d", g0, g1 - 1, G, j, k)
            w = d2.clamp_min(0)
            # All tokens already coincide with a center: pick uniformly (multinomial needs a positive sum).
            w = torch.where(w.sum(1, keepdim=True) > 0, w, torch.ones_like(w))
            pick = torch.multinomial(w, 1, generator=generator).squeeze(1)
            c = xs[rows, pick]
            out[g0:g1, j] = c
            torch.minimum(d2, (xs - c[:, None]).square().sum(-1), out=d2)
    return out


@torch.no_grad()
def lloyd(
    x_ngd: torch.Tensor, centers_gkd: torch.Tensor, iters: int, *, budget_mb: float = 256.0
) -> torch.Tensor:
    """``iters`` Lloyd steps per group (assigned by :func:`nearest_code`); empty clusters stay put."""
    N, G, d = x_ngd.shape
    K = centers_gkd.shape[1]
    c = centers_gkd.clone()
    x = x_ngd.float()
    offsets = torch.arange(G) * K
    for _ in range(iters):
        ids, _ = nearest_code(x, c, budget_mb)
        flat = (ids + offsets).reshape(-1)
        sums = torch.zeros(G * K, d).index_add_(0, flat, x.reshape(-1, d))
        n = torch.bincount(flat, minlength=G * K).to(torch.float32)
        upd = n > 0
        c.view(-1, d)[upd] = sums[upd] / n[upd, None]
    return c
