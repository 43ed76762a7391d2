"""GQ's target-divergence constraint (arXiv 2512.06609, METHODS.md section 3) as a VAE regularizer.

Per latent element, KL(N(mu, sigma^2) || N(0, 1)) in bits is
``(mu^2 + sigma^2 - 1 - log sigma^2) / (2 ln 2)``.
Elements are grouped into tokens and summed: bits per token. The target is ``log2(K)`` with a tolerance
band of +-``tolerance_bits``; tokens above the band are weighted ``lam_max``, inside 1, below ``lam_min``:

    loss = weight * lam * mean_over_tokens(w_token * bits_token)

The three multipliers are buffers (saved with the model) and adapt multiplicatively by ``step`` each training
step (no adaptation in eval mode):

* ``lam`` up when the batch-mean bits per token exceed the target, else down; clamp ``lam_range``.
* ``lam_max`` up when any token is above the band, else down; clamp [1, 1000].
* ``lam_min`` up when no token is below the band, else down; clamp [0.001, 1].

Distributed: the decisions use global batch statistics. All of them reduce to *sums*, so one
``reduce_fn`` (sum in place, like the quantizers') is enough: [sum of bits, number of tokens, tokens above
the band, tokens below the band] is summed across ranks; "the batch max is above the band" is "the count
above the band is > 0", and "the batch min is inside or above the floor" is "the count below is 0". Every
rank then applies the same update, so the multipliers stay bit-identical without a max/min all-reduce.

Token layout (``layout``):

* ``"channels"`` (GQ's): latents (B, C, H, W) or (B, C, L); a token is ``token_channels`` consecutive
  channels at one spatial position (channels [t*d, (t+1)*d) at (h, w)), so there are C/d * H*W tokens.
* ``"flat"`` (revq-ray's :class:`~revq_ray.core.layout.TokenLayout`): the latent flattened C-major and cut
  into tokens of ``token_channels`` consecutive values. Use this one when the quantizer's tokens come from
  ``TokenLayout``, so that the KL budget is constrained on exactly the tokens GQ will quantize.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from revq_ray.core.quantizers.base import ReduceFn, no_reduce

_INV_2LN2 = 1.0 / (2.0 * math.log(2.0))


def kl_bits(mean: torch.Tensor, logvar: torch.Tensor) -> torch.Tensor:
    """Element-wise KL(N(mean, exp(logvar)) || N(0, 1)) in bits."""
    return (mean.square() + logvar.exp() - 1.0 - logvar) * _INV_2LN2


def token_bits(
    mean: torch.Tensor, logvar: torch.Tensor, token_channels: int, layout: str = "channels"
) -> torch.Tensor:
    """Bits per token: (B, C/d, *spatial) for ``layout="channels"``, (B, numel/d) for ``"flat"``."""
    if mean.shape != logvar.shape:
        raise ValueError(
            f"mean {tuple(mean.shape)} and logvar {tuple(logvar.shape)} must have the same shape"
        )
    if mean.dim() not in (3, 4):
        raise ValueError(f"expected latents (B, C, H, W) or (B, C, L), got shape {tuple(mean.shape)}")
    bits = kl_bits(mean.float(), logvar.float())
    B, C = bits.shape[:2]
    if layout == "channels":
        if C % token_channels:
            raise ValueError(f"latent channels C={C} must be a multiple of token_channels={token_channels}")
        return bits.reshape(B, C // token_channels, token_channels, *bits.shape[2:]).sum(2)
    if layout == "flat":
        if bits[0].numel() % token_channels:
            raise ValueError(
                f"latent size {bits[0].numel()} must be a multiple of token_channels={token_channels}"
            )
        return bits.reshape(B, -1, token_channels).sum(-1)
    raise ValueError(f"layout={layout!r}: expected 'channels' or 'flat'")


class TargetDivergenceKL(nn.Module):
    """Weighted KL that steers every token's divergence toward ``log2(codebook_size)`` bits.

    Args:
        codebook_size: K of the GQ quantizer that will follow (target = log2 K bits per token).
        token_channels: d, values per token.
        tolerance_bits: half-width of the target band.
        weight: global loss weight (the reference's 0.1).
        lam_init, lam_max_init, lam_min_init: initial multipliers (the reference starts all at 1).
        step: multiplicative adaptation factor per training step.
        lam_range: clamp of the global ``lam``.
        lam_max_range, lam_min_range: clamps of ``lam_max`` and ``lam_min``.
        logvar_range: clamp of the log-variance (the reference's [-30, 20]).
        layout: ``"channels"`` or ``"flat"`` (module docstring).
        reduce_fn: sums a tensor across ranks in place (no-op single process).
    """

    def __init__(
        self,
        codebook_size: int,
        token_channels: int,
        tolerance_bits: float = 0.5,
        weight: float = 0.1,
        lam_init: float = 1.0,
        lam_max_init: float = 1.0,
        lam_min_init: float = 1.0,
        step: float = 1.01,
        *,
        lam_range: tuple[float, float] = (1e-3, 1e3),
        lam_max_range: tuple[float, float] = (1.0, 1e3),
        lam_min_range: tuple[float, float] = (1e-3, 1.0),
        logvar_range: tuple[float, float] = (-30.0, 20.0),
        layout: str = "channels",
        reduce_fn: ReduceFn = no_reduce,
    ):
        super().__init__()
        if codebook_size < 2:
            raise ValueError(f"codebook_size={codebook_size} must be >= 2")
        if token_channels < 1:
            raise ValueError(f"token_channels={token_channels} must be >= 1")
        if tolerance_bits < 0 or weight < 0 or step < 1:
            raise ValueError(
                f"need tolerance_bits >= 0, weight >= 0, step >= 1; got {tolerance_bits}, {weight}, {step}"
            )
        if layout not in ("channels", "flat"):
            raise ValueError(f"layout={layout!r}: expected 'channels' or 'flat'")
        self.codebook_size, self.token_channels = codebook_size, token_channels
        self.target_bits = math.log2(codebook_size)
        self.tolerance_bits, self.weight, self.step = tolerance_bits, weight, step
        self.lam_range, self.lam_max_range, self.lam_min_range = lam_range, lam_max_range, lam_min_range
        self.logvar_range = logvar_range
        self.layout = layout
        self.reduce_fn = reduce_fn
        # float64 buffers: a 1% step survives any magnitude, and the state is exactly reproducible.
        self.register_buffer("lam", torch.tensor(float(lam_init), dtype=torch.float64))
        self.register_buffer("lam_max", torch.tensor(float(lam_max_init), dtype=torch.float64))
        self.register_buffer("lam_min", torch.tensor(float(lam_min_init), dtype=torch.float64))

    def extra_repr(self) -> str:
        return (
            f"target_bits={self.target_bits:.3f}, tolerance_bits={self.tolerance_bits}, "
            f"weight={self.weight}, "
            f"token_channels={self.token_channels}, layout={self.layout}"
        )

    def forward(
        self, mean: torch.Tensor, logvar: torch.Tensor
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Loss (scalar, differentiable w.r.t. mean and logvar) and detached statistics.

        Statistics: ``bits_mean``, ``bits_min``, ``bits_max`` (local batch), ``frac_above``, ``frac_below``
        (global), ``lam``, ``lam_max``, ``lam_min`` (the values used for this loss, before adaptation).
        """
        logvar = logvar.clamp(*self.logvar_range)
        bits = token_bits(mean, logvar, self.token_channels, self.layout)
        hi = self.target_bits + self.tolerance_bits
        lo = self.target_bits - self.tolerance_bits
        above, below = bits > hi, bits < lo
        lam, lam_max, lam_min = (t.to(bits.dtype) for t in (self.lam, self.lam_max, self.lam_min))
        w = torch.where(above, lam_max, torch.where(below, lam_min, torch.ones_like(bits)))
        loss = self.weight * lam * (w.detach() * bits).mean()

        with torch.no_grad():
            sums = torch.stack(
                [bits.sum(), torch.tensor(bits.numel(), dtype=bits.dtype, device=bits.device),
                 above.sum().to(bits.dtype), below.sum().to(bits.dtype)]
            ).to(torch.float64)  # fmt: skip
            sums = self.reduce_fn(sums)
            total_bits, n, n_above, n_below = sums.tolist()
            stats = {
                "bits_mean": bits.mean().detach(),
                "bits_min": bits.min().detach(),
                "bits_max": bits.max().detach(),
                "frac_above": torch.tensor(n_above / max(n, 1.0)),
                "frac_below": torch.tensor(n_below / max(n, 1.0)),
                "lam": self.lam.detach().clone(),
                "lam_max": self.lam_max.detach().clone(),
                "lam_min": self.lam_min.detach().clone(),
            }
            if self.training:
                self._adapt(total_bits / max(n, 1.0), n_above > 0, n_below > 0)
        return loss, stats

    @torch.no_grad()
    def _adapt(self, global_mean_bits: float, any_above: bool, any_below: bool) -> None:
        s = self.step
        self.lam.mul_(s if global_mean_bits > self.target_bits else 1.0 / s).clamp_(*self.lam_range)
        self.lam_max.mul_(s if any_above else 1.0 / s).clamp_(*self.lam_max_range)
        self.lam_min.mul_(1.0 / s if any_below else s).clamp_(*self.lam_min_range)
