"""How much a frozen decoder cares about each latent channel: the weights of ``model.weighting: decoder``.

For a small latent error ``e`` the decoded output moves by ``J e`` (J: the decoder's Jacobian), so the
output's squared error is ``e^T J^T J e``. Its diagonal, averaged over positions and latents, weighs
channel c: ``w_c = E[(J^T v)_c^2]`` for random sign vectors v in output space (Hutchinson's estimator:
E[v v^T] = I).
Measured in standardized units, it says how many pixels' worth of error one unit of standardized error in
channel c costs. The spread can be large: the taef2 image decoder weighs its 32 channels from 0.008 to 15
(mean 1; four channels carry 91% of the total: the line a weighted training run logs), so a latent MSE
that counts channels alike spends the codebook and the rectifier on channels the image barely shows.

Pure PyTorch: the decoder comes in as a callable (raw latents -> output, differentiable).
"""

from __future__ import annotations

from collections.abc import Callable

import torch


def decoder_channel_weights(
    decode: Callable[[torch.Tensor], torch.Tensor],
    latents: torch.Tensor,
    mean: torch.Tensor,
    std: torch.Tensor,
    *,
    probes: int = 4,
    batch_size: int = 16,
    seed: int = 0,
) -> torch.Tensor:
    """Per-channel decoder sensitivity in standardized units -> (C,) float64, mean 1.

    Args:
        decode: raw latents (B, C, ...) -> decoder output (any shape), differentiable in its input.
        latents: raw latents (N, C, ...) to average over (a few dozen are plenty: the weights are a mean).
        mean, std: the standardizer's per-element statistics (latent shape); the sensitivity is taken with
            respect to the standardized latent ``(z - mean) / std``.
        probes: random sign vectors per latent (the estimator's variance falls as 1 / (N * probes)).
        batch_size: latents per decoder call.
        seed: seeds the probes (the result is deterministic for a given input and seed).
    """
    if latents.dim() < 3:
        raise ValueError(f"latents must be (N, C, ...), got {tuple(latents.shape)}")
    if probes < 1 or len(latents) < 1:
        raise ValueError(f"need at least one latent and one probe, got {len(latents)} and {probes}")
    gen = torch.Generator().manual_seed(seed)
    total = torch.zeros(latents.shape[1], dtype=torch.float64)
    count = 0
    for start in range(0, len(latents), batch_size):
        z = latents[start : start + batch_size].float()
        z_std = ((z - mean) / std).detach().requires_grad_(True)
        with torch.enable_grad():
            out = decode(z_std * std + mean)
            for p in range(probes):
                v = torch.randint(0, 2, out.shape, generator=gen).to(out) * 2 - 1
                (g,) = torch.autograd.grad(out, z_std, v, retain_graph=p < probes - 1)
                # mean over the batch and the positions of (J^T v)^2 = diag(J^T J) in expectation
                total += g.detach().double().pow(2).transpose(0, 1).reshape(len(total), -1).sum(1).cpu()
        count += len(z) * probes
    per_channel = total / (count * max(1, latents[0, 0].numel()))
    if float(per_channel.sum()) <= 0:
        raise ValueError(
            "the decoder's output does not depend on the latent (zero gradient everywhere): is it clamped "
            "everywhere, or frozen with requires_grad off on its input path?"
        )
    return per_channel / per_channel.mean()
