"""SimVQ (arXiv 2411.02038): a frozen random codebook seen through one learnable linear map.

The frozen codebook ``C`` (buffer, (G, K, d), normal with std d^-0.5, drawn from ``seed``) never trains; the
effective codebook is ``Q = C W^T + b`` with a learnable ``W`` (d x d) and bias ``b`` per group, or one pair
shared by every group (``shared=True``). Q is recomputed every forward (without autograd, for the search
only); the selected codes are then mapped again with autograd so that ``W`` and ``b`` get gradients.
Straight-through output, loss ``{"commit": beta * MSE(z, sg(q)) + MSE(q, sg(z))}`` (the second term trains
W and b). :meth:`SimVQ.codes` applies the map (the reference's decode helper forgets it).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from revq_ray.core.precision import as_fp32, full_precision
from revq_ray.core.quantizers.base import Quantizer, QuantOut, ReduceFn, no_reduce, straight_through
from revq_ray.core.quantizers.grouped import CountsMixin, check_ids, check_tokens, gather_codes
from revq_ray.core.quantizers.search import nearest_code


class SimVQ(CountsMixin, Quantizer):
    """SimVQ with G groups of K codes of dim d (see the module docstring).

    Args:
        tokens, dim, codebook_size: G, d, K.
        beta: commitment weight.
        shared: one linear map for all groups instead of one per group (the frozen codebook stays per group).
        seed: seed of the frozen codebook and of the map's init, so every rank builds the same module.
        search_budget_mb: peak extra memory of the nearest-code search.
        reduce_fn: sums a tensor across ranks (usage statistics only: SimVQ has no reset).
    """

    def __init__(
        self,
        tokens: int,
        dim: int,
        codebook_size: int,
        *,
        beta: float = 0.25,
        shared: bool = False,
        seed: int = 0,
        search_budget_mb: float = 256.0,
        reduce_fn: ReduceFn = no_reduce,
    ):
        super().__init__(reduce_fn)
        self._set_sizes(tokens, dim, codebook_size)
        self.beta, self.shared, self.seed = beta, shared, seed
        self.search_budget_mb = search_budget_mb
        gen = torch.Generator().manual_seed(seed)
        frozen = torch.randn(tokens, codebook_size, dim, generator=gen) * dim**-0.5
        # Persistent: the learned map is meaningless without the exact frozen codebook it was trained on.
        self.register_buffer("frozen_codebook", frozen)
        # nn.Linear's default init (the reference uses a plain nn.Linear): U(-1/sqrt(d), 1/sqrt(d)).
        bound = 1.0 / math.sqrt(dim)
        n_maps = 1 if shared else tokens
        w = (torch.rand(n_maps, dim, dim, generator=gen) * 2 - 1) * bound
        b = (torch.rand(n_maps, dim, generator=gen) * 2 - 1) * bound
        self.weight = torch.nn.Parameter(w[0] if shared else w)  # (d, d) or (G, d, d)
        self.bias = torch.nn.Parameter(b[0] if shared else b)  # (d,) or (G, d)
        self._register_counts(tokens, codebook_size)

    def extra_repr(self) -> str:
        return (
            f"tokens={self.tokens}, dim={self.dim}, codebook_size={self.codebook_size}, shared={self.shared}"
        )

    def _map(self, c_xgd: torch.Tensor) -> torch.Tensor:
        """Apply ``c W^T + b`` per group to (..., G, d) frozen codes (one batched matmul over groups)."""
        if self.shared:
            return F.linear(c_xgd, self.weight, self.bias)
        # (X, G, d) -> (G, X, d) @ W^T -> back.
        lead = c_xgd.shape[:-2]
        c = c_xgd.reshape(-1, self.tokens, self.dim).transpose(0, 1)
        q = torch.baddbmm(self.bias[:, None, :], c, self.weight.transpose(1, 2))
        # contiguous: callers reshape the tokens back into latents.
        return q.transpose(0, 1).reshape(*lead, self.tokens, self.dim).contiguous()

    def effective_codebook(self) -> torch.Tensor:
        """Q = C W^T + b, (G, K, d), with autograd (use under no_grad when only searching)."""
        if self.shared:
            return F.linear(self.frozen_codebook, self.weight, self.bias)
        return torch.baddbmm(self.bias[:, None, :], self.frozen_codebook, self.weight.transpose(1, 2))

    def forward(self, tokens_btd: torch.Tensor) -> QuantOut:
        check_tokens(tokens_btd, self.tokens, self.dim)
        # The effective codebook, the search and the map are fp32 with autocast off (core/precision.py).
        with full_precision(tokens_btd.device):
            z = as_fp32(tokens_btd)
            with torch.no_grad():
                q_gkd = self.effective_codebook()
            ids_bt, _ = nearest_code(z.detach(), q_gkd, self.search_budget_mb)
            del q_gkd
            self._count(ids_bt)
            q = self._codes(ids_bt)  # the same arithmetic as codes(): eval output == codes(ids) exactly
            commit = self.beta * F.mse_loss(z, q.detach()) + F.mse_loss(q, z.detach())
            return QuantOut(straight_through(z, q), ids_bt, {"commit": commit})

    def _codes(self, ids_bt: torch.Tensor) -> torch.Tensor:
        return self._map(gather_codes(self.frozen_codebook, ids_bt))

    def codes(self, ids_bt: torch.Tensor) -> torch.Tensor:
        """(B, G) ids -> (B, G, d) effective codes ``C[g, id] W_g^T + b_g``."""
        check_ids(ids_bt, self.tokens, self.codebook_size)
        with full_precision(ids_bt.device):
            return self._codes(ids_bt)
