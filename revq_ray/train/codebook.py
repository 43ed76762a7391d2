"""The codebook's own gradient exchange and optimizer (``train.codebook_update`` = ``rows`` / ``rows_lazy``).

Why: a codebook has G * K rows (512 x 16,384 at 512T, 256 x 262,144 at 256T-L) but one step of global batch B
looks up at most B * G of them. DeepSpeed all-reduces every parameter's dense gradient, so a data-parallel
step would move the whole (G, K, d) codebook gradient (134 MB at 512T, 2.1 GB at 256T-L in fp32) to change a
few MB of it. Here the codebook stays outside DeepSpeed (the rectifier keeps DeepSpeed's all-reduce, ZeRO
partitioning and AdamW):

1. the quantizer's gather makes a sparse COO gradient of the looked-up rows (``GroupedVQ.sparse_grad``);
2. :func:`revq_ray.core.optim.exchange_sparse_rows` coalesces them, all-gathers every rank's (row index,
   row) pairs (padded to the largest rank's count, the counts exchanged first) and sums them per row, then
   scales by 1 / world: the dense all-reduce's arithmetic on the rows that can be non-zero;
3. the codebook group is clipped by :func:`revq_ray.core.optim.clip_grad_norms_` (the norm of the
   averaged gradient, as the dense path's clip measures it: untouched rows add zeros);
4. ``rows_lazy``: :class:`revq_ray.core.optim.RowSparseAdamW` updates only the exchanged rows (lazy Adam;
   see that module for how it differs from AdamW). ``rows``: the exchanged gradient is densified and
   torch's AdamW steps the whole codebook, the same update as ``dense`` (same bytes saved, dense optimizer
   work kept).

The codebook's optimizer state is replicated (every rank gets the same exchanged gradient and applies the
same update), also under ZeRO 1/2, which then partition the rectifier's state only. It is checkpointed by
rank 0 (:data:`STATE_FILE`), and a reset clears the moments of its rows (:meth:`CodebookRows.clear_rows`).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import torch

from revq_ray.config import TrainConfig
from revq_ray.core import optim

STATE_FILE = "codebook_optimizer.pt"
MODES = ("dense", "rows", "rows_lazy")


def resolve_codebook_update(train: TrainConfig, model: Any) -> str:
    """``train.codebook_update`` with ``auto`` resolved, or a clear error where the model cannot do it.

    ``auto`` -> ``rows_lazy`` for quantizers whose codebook is gathered by rows (revq, vq) when the model also
    has rectifier parameters for DeepSpeed to train; ``dense`` otherwise (SimVQ's codebook is a matrix
    product, GQ has no trainable codebook)."""
    rows_ok = hasattr(type(model.quantizer), "sparse_grad")
    has_rect = any(p.requires_grad for p in model.rectifier.parameters())
    has_codebook = any(p.requires_grad for p in model.quantizer.parameters())
    mode = train.codebook_update
    if mode == "auto":
        return "rows_lazy" if rows_ok and has_rect and has_codebook else "dense"
    if mode != "dense" and not (rows_ok and has_codebook):
        raise ValueError(
            f"train.codebook_update={mode}: exchanging codebook rows needs a quantizer that gathers codebook "
            f"rows (model.quantizer.type revq or vq), not {type(model.quantizer).__name__}; set "
            "train.codebook_update to dense or auto"
        )
    if mode != "dense" and not has_rect:
        raise ValueError(
            f"train.codebook_update={mode}: the model has no rectifier parameters (model.rectifier.type="
            "identity), so DeepSpeed would have nothing to train; set train.codebook_update to dense or auto"
        )
    return mode


class RowGather:
    """The trainer's :data:`revq_ray.core.optim.GatherFn`: counts first (one all-gather of an int64 per
    rank), then one all-gather of every rank's rows padded to the largest count. Counts the bytes it hands to
    the collectives (``sent``: this rank's inputs; ``received``: the gathered outputs) for the benchmarks."""

    def __init__(self) -> None:
        import torch.distributed as dist

        self.dist = dist
        self.on = dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1
        self.world = dist.get_world_size() if self.on else 1
        self.sent = 0
        self.received = 0

    def __call__(self, t: torch.Tensor) -> list[torch.Tensor]:
        if not self.on:
            return [t]
        n = torch.tensor([t.shape[0]], dtype=torch.long, device=t.device)
        counts = [torch.empty_like(n) for _ in range(self.world)]
        self.dist.all_gather(counts, n)
        sizes = [int(c) for c in counts]  # needed on the host to size the buffers
        top = max(sizes)
        padded = t if t.shape[0] == top else torch.cat([t, t.new_zeros(top - t.shape[0], *t.shape[1:])])
        out = [torch.empty_like(padded) for _ in range(self.world)]
        self.dist.all_gather(out, padded.contiguous())
        self.sent += n.nbytes + padded.nbytes
        self.received += n.nbytes * self.world + padded.nbytes * self.world
        return [o[:s] for o, s in zip(out, sizes)]


class CodebookRows:
    """The codebook's row exchange, clip and optimizer outside DeepSpeed (one per worker).

    Per step, after ``engine.backward``: :meth:`exchange` (collective), :meth:`clip`, then :meth:`step`
    beside ``engine.step()``."""

    def __init__(self, model: Any, train: TrainConfig, mode: str, world_size: int):
        if mode not in ("rows", "rows_lazy"):
            raise ValueError(f"CodebookRows handles rows / rows_lazy, not {mode!r}")
        self.mode = mode
        self.quantizer = model.quantizer
        self.quantizer.sparse_grad = True
        params = [p for p in self.quantizer.parameters() if p.requires_grad]
        if len(params) != 1 or params[0].dim() != 3:
            raise ValueError("train.codebook_update=rows needs exactly one (G, K, d) codebook parameter")
        self.param = params[0]
        if self.param.dtype != torch.float32:
            raise ValueError(f"the codebook must stay fp32 (got {self.param.dtype})")
        self.world = world_size
        self.gather = RowGather()
        group = {"params": [self.param], "lr": train.lr, "base_lr": train.lr, "weight_decay": 0.0}
        fused = True if train.fused_optimizer else None
        cls = optim.RowSparseAdamW if mode == "rows_lazy" else torch.optim.AdamW
        # Same hyperparameters as the DeepSpeed AdamW of the dense path (engine.deepspeed_config).
        self.optimizer = cls(
            [group], lr=train.lr, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0, fused=fused
        )
        self.rows_touched = 0  # rows of the last exchanged gradient (union over ranks)

    @torch.no_grad()
    def exchange(self) -> None:
        """Collective: replace this rank's sparse codebook gradient by the average over ranks of the rows any
        rank touched (sparse for ``rows_lazy``, densified for ``rows``). Every rank must call it, also one
        whose gradient is empty."""
        p = self.param
        g = p.grad
        if g is None:
            g = torch.sparse_coo_tensor(
                torch.empty(2, 0, dtype=torch.long, device=p.device),
                torch.empty(0, p.shape[2], dtype=p.dtype, device=p.device),
                tuple(p.shape),
            )
        if not g.is_sparse:
            raise RuntimeError("train.codebook_update=rows expects a sparse codebook gradient (sparse_grad)")
        avg = optim.exchange_sparse_rows(p, g, self.gather, self.world)
        self.rows_touched = avg._nnz()
        p.grad = avg if self.mode == "rows_lazy" else avg.to_dense()

    def clip(self, max_norm: float) -> torch.Tensor:
        """Clip the exchanged codebook gradient to ``max_norm`` (0 = measure); returns its pre-clip norm."""
        norms = optim.clip_grad_norms_({"codebook": [self.param]}, max_norm)
        return norms.get("codebook", torch.zeros((), device=self.param.device))

    def set_lr(self, factor: float) -> None:
        for g in self.optimizer.param_groups:
            g["lr"] = g["base_lr"] * factor

    @property
    def lr(self) -> float:
        return float(self.optimizer.param_groups[0]["lr"])

    def step(self) -> None:
        self.optimizer.step()
        self.param.grad = None

    @torch.no_grad()
    def clear_rows(self, groups: torch.Tensor, codes: torch.Tensor) -> int:
        """Zero the Adam moments of reset rows ``(groups[i], codes[i])``; returns elements cleared."""
        state = self.optimizer.state.get(self.param, {})
        cleared = 0
        for key in ("exp_avg", "exp_avg_sq"):
            if key in state:
                state[key][groups.long().to(self.param.device), codes.long().to(self.param.device)] = 0
                cleared += groups.numel() * self.param.shape[2]
        return cleared

    def comm_bytes(self) -> dict[str, int]:
        """Bytes this rank handed to / got from the codebook's collectives since the last call."""
        out = {"sent": self.gather.sent, "received": self.gather.received}
        self.gather.sent = self.gather.received = 0
        return out

    # ----------------------------------------------------------------------------------------- checkpoint
    def save(self, ckpt_dir: str | Path, rank: int) -> None:
        """Rank 0 writes the (replicated) optimizer state."""
        if rank == 0:
            torch.save(
                {"mode": self.mode, "optimizer": self.optimizer.state_dict()}, Path(ckpt_dir, STATE_FILE)
            )

    def load(self, ckpt_dir: str | Path) -> bool:
        """Restore the optimizer state written by :meth:`save` (tensors and plain data only); False when the
        checkpoint has none (it was written by ``dense``: the moments start from zero)."""
        path = Path(ckpt_dir, STATE_FILE)
        if not path.is_file():
            return False
        data = torch.load(path, map_location=self.param.device, weights_only=True)
        if data.get("mode") != self.mode:
            return False
        self.optimizer.load_state_dict(data["optimizer"])
        return True


def dense_grad_bytes(params: list[torch.nn.Parameter]) -> int:
    """Bytes of the gradient buffers DeepSpeed all-reduces per step for ``params`` (fp32 gradients: every
    trainable parameter's full gradient, zero-filled where a rank has none)."""
    return sum(p.numel() * 4 for p in params if p.requires_grad)


def published_bytes(
    tokens: int, codebook_size: int, dim: int, batch: int, rect_params: int, world: int
) -> dict:
    """Bytes per rank and step at a shape: dense all-reduce of codebook + rectifier vs the row exchange
    (worst case: every rank touches ``batch_per_rank * tokens`` distinct rows; ``batch`` is global)."""
    dense_cb = tokens * codebook_size * dim * 4
    per_rank_rows = min(math.ceil(batch / world) * tokens, tokens * codebook_size)
    row_bytes = per_rank_rows * (dim + 1) * 4
    return {
        "dense_codebook": dense_cb,
        "rectifier": rect_params * 4,
        "rows_sent": row_bytes + 8,
        "rows_received": (row_bytes + 8) * world,
    }
