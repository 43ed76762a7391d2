"""Reconstruction and codebook metrics, in pure PyTorch.

Images are (B, C, H, W) floats in [0, ``data_range``]; audio waveforms are (B, L) or (L,). Every per-item
metric takes ``reduction``: ``"mean"`` (a 0-d tensor, the mean of the per-item values, which is how papers
average PSNR/SSIM over a test set) or ``"none"`` (one value per item).

``ssim`` is the standard Wang et al. (2004) SSIM: an 11-tap Gaussian window with sigma 1.5, K1 = 0.01,
K2 = 0.03, population covariances, computed over the "valid" region and averaged over pixels and channels.
It matches ``skimage.metrics.structural_similarity(..., gaussian_weights=True, sigma=1.5,
use_sample_covariance=False, data_range=1)`` to float precision.

Codebook statistics work from ids ``(N, T)`` (one code index per token and group) or from hit counts
``(T, K)``: per-group usage (fraction of codes hit at least once), entropy (nats) of the code distribution,
perplexity ``exp(entropy)`` (``K`` when uniform) and the number of dead codes.
"""

from __future__ import annotations

import math
from typing import Literal

import torch
import torch.nn.functional as F

Reduction = Literal["mean", "none"]

__all__ = [
    "bits_per_sample",
    "code_counts",
    "gaussian_window",
    "mae",
    "mse",
    "psnr",
    "snr",
    "ssim",
    "usage_stats",
]


def _reduce(values_b: torch.Tensor, reduction: Reduction) -> torch.Tensor:
    if reduction == "mean":
        return values_b.mean()
    if reduction == "none":
        return values_b
    raise ValueError(f"reduction={reduction!r}: expected 'mean' or 'none'")


def _check_pair(x: torch.Tensor, y: torch.Tensor, name: str) -> None:
    if x.shape != y.shape:
        raise ValueError(f"{name}: shapes differ, {tuple(x.shape)} vs {tuple(y.shape)}")
    if x.ndim < 1 or x.shape[0] == 0:
        raise ValueError(f"{name}: expected a non-empty batch (B, ...), got shape {tuple(x.shape)}")


def mse(x: torch.Tensor, y: torch.Tensor, reduction: Reduction = "mean") -> torch.Tensor:
    """Mean squared error per item over all non-batch dims."""
    _check_pair(x, y, "mse")
    per_item = (
        (x.double() - y.double()).pow(2).flatten(1).mean(1)
        if x.ndim > 1
        else (x.double() - y.double()).pow(2)
    )
    return _reduce(per_item.float(), reduction)


def mae(x: torch.Tensor, y: torch.Tensor, reduction: Reduction = "mean") -> torch.Tensor:
    """Mean absolute error per item over all non-batch dims."""
    _check_pair(x, y, "mae")
    per_item = (
        (x.double() - y.double()).abs().flatten(1).mean(1) if x.ndim > 1 else (x.double() - y.double()).abs()
    )
    return _reduce(per_item.float(), reduction)


def psnr(
    x: torch.Tensor,
    y: torch.Tensor,
    data_range: float = 1.0,
    reduction: Reduction = "mean",
    eps: float = 1e-12,
) -> torch.Tensor:
    """Peak signal-to-noise ratio in dB per item: ``10 log10(data_range^2 / MSE)``.

    Identical inputs give a large finite value (MSE clamped at ``eps``) rather than inf, so means stay finite.
    """
    per_item = mse(x, y, reduction="none").double().clamp_min(eps)
    return _reduce((10.0 * torch.log10(data_range**2 / per_item)).float(), reduction)


def gaussian_window(size: int = 11, sigma: float = 1.5, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """The normalized 1-D Gaussian window of ``size`` taps (odd)."""
    if size < 1 or size % 2 == 0:
        raise ValueError(f"window size must be a positive odd number, got {size}")
    half = size // 2
    t = torch.arange(-half, half + 1, dtype=dtype)
    g = torch.exp(-(t**2) / (2.0 * sigma**2))
    return g / g.sum()


def ssim(
    x: torch.Tensor,
    y: torch.Tensor,
    data_range: float = 1.0,
    reduction: Reduction = "mean",
    window_size: int = 11,
    sigma: float = 1.5,
    k1: float = 0.01,
    k2: float = 0.03,
) -> torch.Tensor:
    """Structural similarity per image (B, C, H, W) (or (B, H, W) grayscale), averaged over channels.

    Computed in float64 with a separable Gaussian window over the valid region, exactly as skimage does
    (its reflect-padded filter followed by cropping ``window_size // 2`` pixels gives the same numbers).
    """
    _check_pair(x, y, "ssim")
    if x.ndim == 3:
        x, y = x.unsqueeze(1), y.unsqueeze(1)
    if x.ndim != 4:
        raise ValueError(f"ssim: expected images (B, C, H, W) or (B, H, W), got shape {tuple(x.shape)}")
    b, c, h, w = x.shape
    if h < window_size or w < window_size:
        raise ValueError(
            f"ssim: images of {h}x{w} are smaller than the {window_size}x{window_size} window; "
            "pass a smaller odd window_size"
        )
    x = x.double().reshape(b * c, 1, h, w)
    y = y.double().reshape(b * c, 1, h, w)
    g = gaussian_window(window_size, sigma).to(x.device)
    gh, gw = g.view(1, 1, -1, 1), g.view(1, 1, 1, -1)

    def blur(t: torch.Tensor) -> torch.Tensor:
        return F.conv2d(F.conv2d(t, gh), gw)

    mu_x, mu_y = blur(x), blur(y)
    var_x = blur(x * x) - mu_x**2
    var_y = blur(y * y) - mu_y**2
    cov = blur(x * y) - mu_x * mu_y
    c1, c2 = (k1 * data_range) ** 2, (k2 * data_range) ** 2
    s = ((2 * mu_x * mu_y + c1) * (2 * cov + c2)) / ((mu_x**2 + mu_y**2 + c1) * (var_x + var_y + c2))
    per_item = s.reshape(b, c, -1).mean(dim=(1, 2))
    return _reduce(per_item.float(), reduction)


def snr(
    reference: torch.Tensor, estimate: torch.Tensor, reduction: Reduction = "mean", eps: float = 1e-12
) -> torch.Tensor:
    """Signal-to-noise ratio in dB per waveform: ``10 log10(sum ref^2 / sum (ref - est)^2)``.

    Accepts (L,) or (B, L) (any trailing shape is flattened per item).
    """
    if reference.ndim == 1:
        reference, estimate = reference.unsqueeze(0), estimate.unsqueeze(0)
    _check_pair(reference, estimate, "snr")
    ref = reference.double().flatten(1)
    err = ref - estimate.double().flatten(1)
    per_item = 10.0 * torch.log10(ref.pow(2).sum(1).clamp_min(eps) / err.pow(2).sum(1).clamp_min(eps))
    return _reduce(per_item.float(), reduction)


# --------------------------------------------------------------------------------------------- codebooks
def code_counts(ids_nt: torch.Tensor, codebook_size: int) -> torch.Tensor:
    """Hit counts (T, K) per group from ids (N, T) with values in [0, K)."""
    if ids_nt.ndim == 1:
        ids_nt = ids_nt.unsqueeze(1)
    if ids_nt.ndim != 2:
        raise ValueError(f"ids must be (N, T), got shape {tuple(ids_nt.shape)}")
    ids = ids_nt.long()
    if ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= codebook_size):
        raise ValueError(
            f"ids outside [0, {codebook_size}): min {int(ids.min())}, max {int(ids.max())} "
            "(is codebook_size the model's model.quantizer.codebook_size?)"
        )
    t = ids.shape[1]
    offsets = torch.arange(t, device=ids.device) * codebook_size
    flat = (ids + offsets).reshape(-1)
    return torch.bincount(flat, minlength=t * codebook_size).reshape(t, codebook_size)


def usage_stats(
    ids_nt: torch.Tensor | None = None,
    codebook_size: int | None = None,
    counts_tk: torch.Tensor | None = None,
) -> dict[str, torch.Tensor | float]:
    """Per-group codebook statistics from ids (N, T) plus ``codebook_size``, or from counts (T, K).

    Returns per-group tensors (T,): ``usage`` (fraction of codes hit at least once), ``entropy`` (nats of the
    empirical code distribution; ``log K`` when uniform), ``perplexity`` (``exp(entropy)``), ``dead``
    (codes never hit); and scalars: their means, ``entropy_bits`` (mean, in bits), ``max_entropy``
    (``log K``) and ``codebook_size``.
    """
    if counts_tk is None:
        if ids_nt is None or codebook_size is None:
            raise ValueError("usage_stats: pass ids_nt with codebook_size, or counts_tk")
        counts_tk = code_counts(ids_nt, codebook_size)
    counts = counts_tk.double()
    if counts.ndim == 1:
        counts = counts.unsqueeze(0)
    k = counts.shape[1]
    total = counts.sum(1, keepdim=True)
    p = counts / total.clamp_min(1.0)
    entropy = -(p * torch.log(p.clamp_min(1e-300))).sum(1)
    used = (counts > 0).double()
    out: dict[str, torch.Tensor | float] = {
        "usage": used.mean(1).float(),
        "entropy": entropy.float(),
        "perplexity": entropy.exp().float(),
        "dead": (k - used.sum(1)).long(),
    }
    out["mean_usage"] = float(out["usage"].mean())
    out["mean_entropy"] = float(entropy.mean())
    out["mean_perplexity"] = float(out["perplexity"].mean())
    out["entropy_bits"] = float(entropy.mean() / math.log(2.0))
    out["max_entropy"] = math.log(k)
    out["codebook_size"] = float(k)
    return out


def bits_per_sample(tokens: int, codebook_size: int) -> float:
    """Bits per latent (image / clip) of ``tokens`` ids with ``codebook_size`` codes each: ``T log2 K``."""
    return tokens * math.log2(codebook_size)
