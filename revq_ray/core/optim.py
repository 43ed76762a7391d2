"""Fast pieces of the ReVQ training step: a row-sparse (lazy) AdamW for codebooks and per-module clipping.

Why: a codebook has G * K rows (512 x 16,384 at 512T, 256 x 262,144 at 256T-L), but one step of batch B looks
up at most B * G of them (131,072 at 512T, 1/64 of the rows). The reference recipe still pays for the whole
codebook every step: the backward of the gather builds a dense (G, K, d) gradient (a zero fill plus scatter),
clipping reads it, and dense AdamW reads and writes parameter, gradient and both moments (about ten passes in
torch's unfused implementation). Here the gradient stays a sparse COO tensor of the looked-up rows
(:class:`~revq_ray.core.quantizers.grouped.GroupedVQ` with ``sparse_grad = True``), clipping reads its values
only, and :class:`RowSparseAdamW` updates only those rows.

**Semantics (read before switching it on).** :class:`RowSparseAdamW` is *lazy Adam* (as
``torch.optim.SparseAdam`` and TensorFlow's ``LazyAdam``), with decoupled weight decay applied to the updated
rows only:

* a row with gradient this step gets exactly the dense AdamW update of that row (same formulas, same order of
  floating-point operations, bias correction from the parameter's global step count);
* a row without gradient is left alone: its moments are *not* decayed and it does *not* move. Dense AdamW
  instead decays both moments of every row by beta1 / beta2 and moves a row by
  ``lr * m_hat / (sqrt(v_hat) + eps)`` as long as its first moment is non-zero, i.e. a code keeps drifting
  for some steps after its last hit.

So the two agree exactly (i) at the first step, (ii) on every row that received gradient at every step since
its moments were zero (e.g. since a reset cleared them), and (iii) always on rows never hit. They differ on
rows hit intermittently: there lazy Adam takes the moment of the *last hit* as is, where dense Adam would
have decayed it. Which is "right" is a modelling choice (lazy Adam is the standard choice for embedding
tables). The DeepSpeed trainer uses it for ``train.codebook_update: rows_lazy`` (the default for revq/vq, see
:mod:`revq_ray.train.codebook`, which exchanges only the touched rows between workers with
:func:`exchange_sparse_rows`); ``rows`` and ``dense`` keep dense AdamW.

Dense gradients (the rectifier, or a codebook whose quantizer makes dense gradients) go through
``torch.optim.AdamW`` itself (this class *is* an AdamW), so ``fused=True`` / ``foreach`` apply to them.

Host syncs: nothing here calls ``.item()`` on a device tensor; the step count lives on the CPU as in torch's
non-capturable AdamW. Coalescing a sparse gradient has a data-dependent size, which on CUDA means one implicit
synchronization per sparse parameter per step (the dense fused path has none).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:  # pragma: no cover
    from revq_ray.config import TrainConfig
    from revq_ray.core.model import ReVQModel

__all__ = [
    "RowSparseAdamW",
    "build_optimizer",
    "build_train_optimizer",
    "clip_grad_norms_",
    "coalesce_sparse_grads_",
    "exchange_sparse_rows",
    "local_gather",
    "sparse_rows",
]

GatherFn = Callable[[torch.Tensor], list[torch.Tensor]]
"""All-gather of a tensor whose first dim may differ between ranks -> one tensor per rank, in rank order."""


def local_gather(t: torch.Tensor) -> list[torch.Tensor]:
    """The single-process :data:`GatherFn`: this rank's tensor is everything."""
    return [t]


def sparse_rows(param: torch.Tensor, grad: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Coalesced sparse ``grad`` of ``param`` -> (flat row index (n,), row gradients (n, row_numel)).

    A row is one index of the sparse dims (e.g. (group, code) of a (G, K, d) codebook with a 2-sparse-dim
    gradient); the rows are unique and ascending because ``grad`` is coalesced.
    """
    s = grad.sparse_dim()
    idx = grad._indices()  # (s, n); _indices: no coalesce check (the caller coalesced)
    vals = grad._values()  # (n, *dense dims)
    shape = param.shape
    rows = idx[0]
    for i in range(1, s):
        rows = rows * shape[i] + idx[i]
    return rows, vals.reshape(vals.shape[0], math.prod(vals.shape[1:]))


@torch.no_grad()
def exchange_sparse_rows(
    param: torch.Tensor, grad: torch.Tensor, gather_fn: GatherFn = local_gather, world_size: int = 1
) -> torch.Tensor:
    """The data-parallel average of a row-sparse gradient, exchanging only the rows each rank touched.

    ``grad`` is this rank's sparse COO gradient of ``param`` (e.g. a (G, K, d) codebook with sparse dims
    (g, k)). Each rank coalesces its rows (duplicates summed), packs (flat row index, row values) into one
    (n, 1 + row) fp32 tensor (the int32 index bit-cast into the first column, so one collective carries both)
    and hands it to ``gather_fn``; the union of all ranks' rows is summed per row and scaled by
    ``1 / world_size``. That is the dense all-reduce's arithmetic (sum over ranks, then DeepSpeed's
    post-scale by 1 / world) restricted to the rows that are non-zero somewhere: rows touched on no rank are
    zero in both. With two ranks the per-row sum ``a + b`` is the all-reduce's exactly; with more, the order
    of the per-row additions may differ from the collective's, so results agree to rounding.

    Returns a coalesced sparse COO tensor shaped like ``param`` with the same sparse dims as ``grad``.
    Pure PyTorch: the collective is injected (:func:`local_gather` in a single process).
    """
    if not grad.is_coalesced():
        grad = grad.coalesce()
    s = grad.sparse_dim()
    rows, vals = sparse_rows(param, grad)
    n_rows = math.prod(param.shape[:s])
    if n_rows >= 2**31:
        raise ValueError(f"exchange_sparse_rows: {n_rows} rows do not fit the int32 row index")
    if vals.dtype != torch.float32:
        raise ValueError(f"exchange_sparse_rows: the gradient must be fp32 (got {vals.dtype})")
    packed = torch.cat([rows.to(torch.int32).view(torch.float32)[:, None], vals], dim=1)
    parts = gather_fn(packed)
    allp = torch.cat(parts) if len(parts) > 1 else parts[0]
    all_rows = allp[:, 0].contiguous().view(torch.int32).long()
    all_vals = allp[:, 1:]
    # Unravel the flat row index into the sparse dims again.
    idx, rest = [], all_rows
    for dim in reversed(param.shape[1:s]):
        idx.append(rest % dim)
        rest = rest // dim
    idx.append(rest)
    indices = torch.stack(idx[::-1])
    out = torch.sparse_coo_tensor(
        indices, all_vals.reshape(-1, *param.shape[s:]), tuple(param.shape), check_invariants=False
    ).coalesce()
    if world_size > 1:
        out._values().mul_(1.0 / world_size)
    return out


@torch.no_grad()
def coalesce_sparse_grads_(params: Iterable[torch.Tensor]) -> None:
    """Replace every uncoalesced sparse ``.grad`` by its coalesced form (duplicates summed), in place."""
    for p in params:
        if p.grad is not None and p.grad.is_sparse and not p.grad.is_coalesced():
            p.grad = p.grad.coalesce()


class RowSparseAdamW(torch.optim.AdamW):
    """AdamW whose parameters with a sparse (COO) gradient get a lazy, row-sparse update.

    Same arguments as :class:`torch.optim.AdamW` (``amsgrad`` is not supported for sparse gradients). Dense
    gradients take torch's own AdamW code path unchanged (so ``fused`` / ``foreach`` apply); sparse gradients
    (e.g. the codebook's, from ``GroupedVQ.sparse_grad = True``) update only their rows, see the module doc
    for exactly how that differs from dense AdamW. State (``step``, ``exp_avg``, ``exp_avg_sq``) has the same
    keys, shapes and dtypes as AdamW's, so checkpoints and code that clears moments of reset rows work
    unchanged.
    """

    @torch.no_grad()
    def step(self, closure=None):  # type: ignore[override]
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        # Hide the sparse gradients from AdamW (which rejects them), run it for the dense ones, put them back.
        hidden: list[tuple[torch.Tensor, torch.Tensor, dict]] = []
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is not None and p.grad.is_sparse:
                    hidden.append((p, p.grad, group))
                    p.grad = None
        try:
            super().step()
        finally:
            for p, g, _ in hidden:
                p.grad = g
        for p, g, group in hidden:
            self._sparse_update(p, g, group)
        return loss

    def _sparse_update(self, p: torch.Tensor, grad: torch.Tensor, group: dict) -> None:
        if group["amsgrad"]:
            raise RuntimeError("RowSparseAdamW: amsgrad is not supported for sparse gradients")
        if group["maximize"]:
            grad = -grad
        if not p.is_contiguous():
            raise RuntimeError("RowSparseAdamW needs contiguous parameters for row-sparse updates")
        state = self.state[p]
        if len(state) == 0:
            # Same layout as torch's non-capturable AdamW: a float32 CPU step and zero moments like p.
            state["step"] = torch.tensor(0.0, dtype=torch.float32)
            state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
        step_t = state["step"]
        step_t.add_(1)
        # A CPU tensor (as torch's non-capturable AdamW keeps it): reading it is no device synchronization.
        step = float(step_t)
        if not grad.is_coalesced():
            grad = grad.coalesce()
        rows, g = sparse_rows(p, grad)
        if rows.numel() == 0:
            return
        lr = float(group["lr"])
        beta1, beta2 = (float(b) for b in group["betas"])
        eps, wd = float(group["eps"]), float(group["weight_decay"])
        p2 = p.view(-1, g.shape[1])  # (rows over the sparse dims, elements per row)
        m2 = state["exp_avg"].view(p2.shape)
        v2 = state["exp_avg_sq"].view(p2.shape)
        g = g.to(p.dtype)
        p_r = p2.index_select(0, rows)
        m_r = m2.index_select(0, rows)
        v_r = v2.index_select(0, rows)
        # The formulas and their order are torch's single-tensor AdamW (torch/optim/adam.py), row by row, so a
        # row updated here equals the same row under torch.optim.AdamW(foreach=False) bit for bit.
        if wd != 0:
            p_r.mul_(1 - lr * wd)
        m_r.lerp_(g, 1 - beta1)
        v_r.mul_(beta2).addcmul_(g, g, value=1 - beta2)
        bias_correction1 = 1 - beta1**step
        bias_correction2 = 1 - beta2**step
        step_size = lr / bias_correction1
        denom = (v_r.sqrt() / math.sqrt(bias_correction2)).add_(eps)
        p_r.addcdiv_(m_r, denom, value=-step_size)
        p2.index_copy_(0, rows, p_r)
        m2.index_copy_(0, rows, m_r)
        v2.index_copy_(0, rows, v_r)


def _grad_norm(g: torch.Tensor) -> torch.Tensor:
    if g.is_sparse:
        return torch.linalg.vector_norm(g._values(), 2.0)  # coalesced: duplicates already summed
    return torch.linalg.vector_norm(g, 2.0)


@torch.no_grad()
def clip_grad_norms_(
    groups: Mapping[str, Iterable[torch.Tensor]], max_norm: float, eps: float = 1e-6
) -> dict[str, torch.Tensor]:
    """Clip the gradient norm of each named group of parameters to ``max_norm`` separately, in place.

    The ReVQ recipe clips the codebook and the rectifier each to norm 1. Same result as calling
    ``torch.nn.utils.clip_grad_norm_(params, max_norm)`` once per group (same formula: the norm of the
    per-tensor norms, scale by ``min(1, max_norm / (norm + 1e-6))``), but sparse gradients are supported
    (their values are coalesced first, so duplicate rows add up before the norm) and nothing leaves the device
    (the returned pre-clip norms are 0-dim tensors; call ``float()`` only when you log). ``max_norm <= 0``
    measures without clipping.
    """
    norms: dict[str, torch.Tensor] = {}
    for name, params in groups.items():
        ps = [p for p in params if p.grad is not None]
        coalesce_sparse_grads_(ps)
        if not ps:
            continue
        per = [_grad_norm(p.grad) for p in ps]
        total = torch.linalg.vector_norm(torch.stack([n.to(per[0].device) for n in per]), 2.0)
        norms[name] = total
        if max_norm > 0:
            coef = torch.clamp(max_norm / (total + eps), max=1.0)
            for p in ps:
                g = p.grad
                (g._values() if g.is_sparse else g).mul_(coef.to(g.device))
    return norms


def build_optimizer(
    model: ReVQModel,
    *,
    lr: float,
    rectifier_lr_scale: float = 0.05,
    rectifier_weight_decay: float = 1e-4,
    sparse_codebook: bool = False,
    fused: bool | None = None,
    betas: tuple[float, float] = (0.9, 0.999),
    eps: float = 1e-8,
) -> RowSparseAdamW:
    """The reference recipe's AdamW over ``model.param_groups()``, with the fast paths as options.

    Groups (in this order, empty ones dropped): ``codebook`` (lr ``lr``, no weight decay) and ``rectifier``
    (lr ``lr * rectifier_lr_scale``, weight decay ``rectifier_weight_decay``); each group dict also carries
    ``name`` and ``base_lr`` (for an lr schedule). ``sparse_codebook=True`` switches the quantizer to sparse
    codebook gradients (``GroupedVQ.sparse_grad``), so the codebook gets the lazy row-sparse update (see the
    module doc for how that differs from dense AdamW); only ``revq``/``vq`` quantizers support it.
    ``fused`` is passed to AdamW for the dense gradients (``True``: torch's fused kernel, CPU or CUDA).
    """
    groups = model.param_groups()
    if sparse_codebook:
        if not hasattr(type(model.quantizer), "sparse_grad"):
            raise ValueError(
                "sparse_codebook=True (train.codebook_update=rows_lazy) needs a quantizer whose codebook is "
                f"gathered by rows (model.quantizer.type revq or vq), not {type(model.quantizer).__name__}; "
                "use dense"
            )
        model.quantizer.sparse_grad = True
    spec = {"codebook": (lr, 0.0), "rectifier": (lr * rectifier_lr_scale, rectifier_weight_decay)}
    param_groups = [
        {"params": groups[name], "lr": spec[name][0], "base_lr": spec[name][0], "weight_decay": spec[name][1],
         "name": name}
        for name in ("codebook", "rectifier")
        if groups.get(name)
    ]  # fmt: skip
    if not param_groups:
        raise ValueError("the model has no trainable parameters: nothing to optimize")
    return RowSparseAdamW(param_groups, lr=lr, betas=betas, eps=eps, weight_decay=0.0, fused=fused)


def build_train_optimizer(model: ReVQModel, train: TrainConfig) -> RowSparseAdamW:
    """:func:`build_optimizer` from a ``TrainConfig``, after applying ``train.channels_last`` (rectifier).

    Reads ``lr``, ``rectifier_lr_scale``, ``rectifier_weight_decay``, ``codebook_update`` and
    ``fused_optimizer``, as the DeepSpeed trainer does in one process: ``rows_lazy`` (and ``auto`` for a
    quantizer that gathers codebook rows) gives sparse codebook gradients and the lazy row-sparse update;
    ``rows`` and ``dense`` the dense AdamW update (in one process there is nothing to exchange).
    """
    lazy = train.codebook_update == "rows_lazy" or (
        train.codebook_update == "auto" and hasattr(type(model.quantizer), "sparse_grad")
    )
    if train.channels_last or (train.channels_last is None and train.zero_stage == 0):  # None = auto
        # Only 4-D conv weights change layout (Module.to leaves other tensors alone); values are unchanged.
        model.rectifier.to(memory_format=torch.channels_last)
    return build_optimizer(
        model,
        lr=train.lr,
        rectifier_lr_scale=train.rectifier_lr_scale,
        rectifier_weight_decay=train.rectifier_weight_decay,
        sparse_codebook=lazy,
        fused=True if train.fused_optimizer else None,
    )
