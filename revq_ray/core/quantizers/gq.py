"""GQ (arXiv 2512.06609): quantize a Gaussian posterior onto fixed prior samples, without training.

The codebook is K samples of N(0, I_d): a scrambled Sobol sequence (``SobolEngine(d, scramble=True,
seed=seed)``) pushed through the inverse normal CDF. It is regenerated from (seed, K, d) and not saved
(non-persistent buffer), so those three must match between training and decoding. **All groups share the
same prior samples** (as in the reference: one prior codebook per token dim); ids are still per group.

For a token with posterior N(mu, sigma^2) the code is

    argmax_j  sum_d [ log N(c_jd; mu_d, sigma_d) - beta * log N(c_jd; 0, 1) ]
  = argmax_j  sum_d [ c_jd * mu_d / s2_d + c_jd^2 * (beta - 1 / s2_d) / 2 ]     (dropping per-token constants)

which is one matmul of features ``[mu / s2, (beta - 1/s2) / 2]`` with keys ``[c, c^2]``, chunked within the
memory budget exactly like the nearest-code search. Without a log-variance the posterior is taken as a point
mass: the nearest prior sample (squared Euclidean). The quantized value is the prior sample itself;
:meth:`GaussianQuant.codes` returns it exactly. No trainable parameters and no losses: GQ's training happens
in the VAE (see :class:`revq_ray.core.regularizers.TargetDivergenceKL`); the rectifier still trains on its
output.

Input: the posterior mean and log-variance in the *VAE's own units* (the prior is N(0, 1) there), not
standardized latents.
"""

from __future__ import annotations

import torch

from revq_ray.core.quantizers.base import Quantizer, QuantOut, ReduceFn, no_reduce
from revq_ray.core.quantizers.grouped import CountsMixin, check_ids, check_tokens
from revq_ray.core.quantizers.search import chunked_argmin, nearest_code, plan_search

# Keeps ndtri finite: the most extreme prior value is about +-6.1 sigma.
_SOBOL_EPS = 1e-9


def gaussian_prior_samples(codebook_size: int, dim: int, seed: int) -> torch.Tensor:
    """(K, d) float32 quasi-random samples of N(0, I_d): scrambled Sobol -> inverse normal CDF."""
    if dim > torch.quasirandom.SobolEngine.MAXDIM:
        raise ValueError(
            f"gq token dim {dim} exceeds SobolEngine's maximum {torch.quasirandom.SobolEngine.MAXDIM}"
        )
    engine = torch.quasirandom.SobolEngine(dim, scramble=True, seed=seed)
    u = engine.draw(codebook_size, dtype=torch.float64)
    return torch.special.ndtri(u.clamp(_SOBOL_EPS, 1 - _SOBOL_EPS)).to(torch.float32)


def _neg_log_ratio(rows_re: torch.Tensor, cand_rne: torch.Tensor) -> torch.Tensor:
    """Exact (unexpanded) negative score: rows = [mu, 1/s2, beta], candidates = [c, c^2]."""
    d = cand_rne.shape[-1] // 2
    mu, inv_s2, beta = rows_re[:, None, :d], rows_re[:, None, d : 2 * d], rows_re[:, None, 2 * d :]
    c = cand_rne[..., :d]
    return (0.5 * (c - mu).square() * inv_s2 - 0.5 * beta * c.square()).sum(-1)


class GaussianQuant(CountsMixin, Quantizer):
    """GQ over G groups of dim d with K shared prior samples (see the module docstring).

    Args:
        tokens, dim, codebook_size: G, d, K (K a power of two suits the Sobol sequence best).
        beta: prior weight in the log-ratio score (``model.quantizer.gq_beta``).
        seed: Sobol scramble seed (``model.quantizer.gq_seed``).
        logvar_range: clamp applied to log-variances (the reference's [-30, 20]).
        search_budget_mb: peak extra memory of the score search.
        reduce_fn: sums a tensor across ranks (usage statistics only).
    """

    def __init__(
        self,
        tokens: int,
        dim: int,
        codebook_size: int,
        *,
        beta: float = 1.0,
        seed: int = 0,
        logvar_range: tuple[float, float] = (-30.0, 20.0),
        search_budget_mb: float = 256.0,
        reduce_fn: ReduceFn = no_reduce,
    ):
        super().__init__(reduce_fn)
        self._set_sizes(tokens, dim, codebook_size)
        self.beta, self.seed = beta, seed
        self.logvar_range = (float(logvar_range[0]), float(logvar_range[1]))
        self.search_budget_mb = search_budget_mb
        prior = gaussian_prior_samples(codebook_size, dim, seed)
        self.register_buffer("prior", prior, persistent=False)  # (K, d), regenerated from the seed
        self.register_buffer("_keys", torch.cat([prior, prior.square()], -1), persistent=False)  # (K, 2d)
        self._register_counts(tokens, codebook_size)

    def extra_repr(self) -> str:
        return (
            f"tokens={self.tokens}, dim={self.dim}, codebook_size={self.codebook_size}, beta={self.beta}, "
            f"seed={self.seed}"
        )

    @torch.no_grad()
    def quantize_ids(self, mean_btd: torch.Tensor, logvar_btd: torch.Tensor | None = None) -> torch.Tensor:
        """(B, G) ids of the best prior sample for each token's posterior (nearest when logvar is None)."""
        check_tokens(mean_btd, self.tokens, self.dim)
        B, G, d = mean_btd.shape
        mu = mean_btd.detach().reshape(1, B * G, d)  # one shared codebook: search all tokens at once
        if logvar_btd is None:
            ids, _ = nearest_code(mu.transpose(0, 1), self.prior[None], self.search_budget_mb)
            return ids.view(B, G)
        check_tokens(logvar_btd, self.tokens, self.dim, "logvar_btd")
        dt = torch.promote_types(mu.dtype, torch.float32)
        mu = mu.to(dt)
        inv_s2 = torch.exp(-logvar_btd.detach().reshape(1, B * G, d).to(dt).clamp(*self.logvar_range))
        feats = torch.cat([mu * inv_s2, 0.5 * (self.beta - inv_s2)], -1)  # (1, N, 2d)
        exact = torch.cat([mu, inv_s2, torch.full_like(mu[..., :1], self.beta)], -1)  # (1, N, 2d + 1)
        keys = self._keys.to(dt)[None]
        plan = plan_search(
            B * G, 1, self.codebook_size, 2 * d + 1, budget_mb=self.search_budget_mb,
            elem_bytes=torch.finfo(dt).bits // 8, device=mu.device, key_dim=2 * d,
        )  # fmt: skip
        ids, _ = chunked_argmin(
            feats, keys, alpha=-1.0, sqnorm_bias=False, exact_fn=_neg_log_ratio, plan=plan, x_exact_gbe=exact
        )
        return ids.view(B, G)

    def forward(self, tokens_btd: torch.Tensor, *, logvar_btd: torch.Tensor | None = None) -> QuantOut:
        """Quantize posterior means (B, G, d) (with optional log-variances) to prior samples."""
        ids_bt = self.quantize_ids(tokens_btd, logvar_btd)
        self._count(ids_bt)
        return QuantOut(self.prior[ids_bt], ids_bt, {})  # fp32 prior samples, whatever the input dtype

    def codes(self, ids_bt: torch.Tensor) -> torch.Tensor:
        """(B, G) ids -> (B, G, d) prior samples (exactly the forward's output)."""
        check_ids(ids_bt, self.tokens, self.codebook_size)
        return self.prior[ids_bt.long()]
