"""Rectifiers: small networks at latent resolution that map the quantized latent back toward the original.

ReVQ's rectifier (``vit``) follows the reference (a one-stage DC-AE decoder at latent resolution): conv3x3
C->W with a channel-repeat shortcut, ``depth`` EfficientViT blocks (ReLU linear attention with multi-scale
5x5 aggregation of q/k/v, then a GLU-MBConv feed-forward), RMSNorm, ReLU, conv3x3 W->C. ``cnn`` swaps the
EfficientViT blocks for DC-AE residual conv blocks, ``mlp`` for per-position (1x1) MLP blocks, and
``identity`` is no rectifier at all (the "MSE without rectifier" ablation).

Every rectifier works on images (B, C, H, W) and audio (B, C, L):
- built with ``spatial_dims=2`` (default), a (B, C, L) input is run as (B, C, L, 1) and squeezed back;
- built with ``spatial_dims=1``, it uses Conv1d throughout (3x3 -> 3, 5x5 -> 5), which is what
  :class:`~revq_ray.core.model.ReVQModel` builds for a (C, L) latent (no wasted kernel columns).

Unlike the reference, the output is ``x + f(x)`` with the last conv zero-initialized, so an untrained
rectifier is exactly the identity: at step 0 the model's reconstruction is the quantized latent itself
(never worse than no rectifier) and training only has to learn the correction. The last conv still gets
gradient at step 0 (its input is non-zero), so nothing is stuck.

This module is pure PyTorch on purpose (no diffusers): the blocks are a few dozen lines each.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn

if TYPE_CHECKING:  # pragma: no cover - the bridge reads a config object; the core never imports pydantic
    from revq_ray.config import RectifierConfig

__all__ = [
    "RMSNorm",
    "LiteMLA",
    "GLUMBConv",
    "EfficientViTBlock",
    "ResConvBlock",
    "MLPBlock",
    "Rectifier",
    "IdentityRectifier",
    "build_rectifier",
    "vit_param_count",
]


def _conv(spatial_dims: int):
    if spatial_dims == 1:
        return nn.Conv1d
    if spatial_dims == 2:
        return nn.Conv2d
    raise ValueError(f"spatial_dims={spatial_dims}: expected 1 (audio (B, C, L)) or 2 (images (B, C, H, W))")


class RMSNorm(nn.Module):
    """RMSNorm over the channel dim (dim 1) of (B, C, *spatial), with weight and bias (as DC-AE uses)."""

    def __init__(self, channels: int, eps: float = 1e-5):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(channels))
        self.bias = nn.Parameter(torch.zeros(channels))

    def forward(self, x_bc: torch.Tensor) -> torch.Tensor:
        # Statistics in fp32 so bf16 training does not lose the normalization.
        var = x_bc.float().pow(2).mean(1, keepdim=True)
        x = (x_bc.float() * torch.rsqrt(var + self.eps)).to(x_bc.dtype)
        shape = (1, -1) + (1,) * (x_bc.dim() - 2)
        return x * self.weight.view(shape) + self.bias.view(shape)


class LiteMLA(nn.Module):
    """EfficientViT's lightweight multi-scale linear attention, with a residual.

    qkv = 1x1 conv (no bias); a second "scale" aggregates qkv with a depthwise k x k conv and a 1x1 conv
    grouped per head; both scales attend with ReLU linear attention (head dim ``head_dim``), are projected
    back to ``channels`` (1x1, no bias) and RMS-normalized. Cost is linear in the number of positions.
    """

    def __init__(
        self, channels: int, head_dim: int = 32, scales: tuple[int, ...] = (5,), spatial_dims: int = 2
    ):
        super().__init__()
        if channels % head_dim:
            raise ValueError(
                f"rectifier.width={channels} must be a multiple of rectifier.head_dim={head_dim}"
            )
        Conv = _conv(spatial_dims)
        self.head_dim = head_dim
        heads = channels // head_dim
        inner = heads * head_dim
        self.qkv = Conv(channels, 3 * inner, 1, bias=False)
        # One aggregation branch per kernel size: depthwise spatial mixing, then per-head channel mixing.
        self.aggreg = nn.ModuleList(
            nn.Sequential(
                Conv(3 * inner, 3 * inner, k, padding=k // 2, groups=3 * inner, bias=False),
                Conv(3 * inner, 3 * inner, 1, groups=3 * heads, bias=False),
            )
            for k in scales
        )
        self.proj = Conv(inner * (1 + len(scales)), channels, 1, bias=False)
        self.norm = RMSNorm(channels)
        self.eps = 1e-15

    def forward(self, x_bc: torch.Tensor) -> torch.Tensor:
        b, _, *spatial = x_bc.shape
        qkv = self.qkv(x_bc)
        qkv = torch.cat([qkv] + [agg(qkv) for agg in self.aggreg], dim=1)
        # (B, heads * scales, 3 * head_dim, N) in fp32: the normalizer of linear attention is a sum over
        # all positions and loses too much in bf16.
        qkv = qkv.float().reshape(b, -1, 3 * self.head_dim, qkv.shape[2:].numel())
        q, k, v = qkv.chunk(3, dim=2)
        q, k = F.relu(q), F.relu(k)
        # Linear attention: out_n = sum_m v_m (k_m . q_n) / sum_m (k_m . q_n), computed as (V K^T) Q with
        # a row of ones appended to V that yields the normalizer in the same matmul.
        v = F.pad(v, (0, 0, 0, 1), value=1.0)
        out = (v @ k.transpose(-1, -2)) @ q
        out = out[:, :, :-1] / (out[:, :, -1:] + self.eps)
        out = out.to(x_bc.dtype).reshape(b, -1, *spatial)
        return x_bc + self.norm(self.proj(out))


class GLUMBConv(nn.Module):
    """Gated MBConv feed-forward with a residual: 1x1 up (x2 for the gate), SiLU, depthwise 3x3,
    ``a * SiLU(gate)``, 1x1 down (no bias), RMSNorm."""

    def __init__(self, channels: int, expand_ratio: float = 4.0, spatial_dims: int = 2):
        super().__init__()
        Conv = _conv(spatial_dims)
        hidden = max(1, int(channels * expand_ratio))
        self.inverted = Conv(channels, 2 * hidden, 1)
        self.depth = Conv(2 * hidden, 2 * hidden, 3, padding=1, groups=2 * hidden)
        self.point = Conv(hidden, channels, 1, bias=False)
        self.norm = RMSNorm(channels)

    def forward(self, x_bc: torch.Tensor) -> torch.Tensor:
        h = self.depth(F.silu(self.inverted(x_bc)))
        h, gate = h.chunk(2, dim=1)
        return x_bc + self.norm(self.point(h * F.silu(gate)))


class EfficientViTBlock(nn.Module):
    """DC-AE's EfficientViT block: :class:`LiteMLA` (context), then :class:`GLUMBConv` (local), residual."""

    def __init__(self, channels: int, head_dim: int = 32, expand_ratio: float = 4.0, spatial_dims: int = 2):
        super().__init__()
        self.attn = LiteMLA(channels, head_dim, (5,), spatial_dims)
        self.ffn = GLUMBConv(channels, expand_ratio, spatial_dims)

    def forward(self, x_bc: torch.Tensor) -> torch.Tensor:
        return self.ffn(self.attn(x_bc))


class ResConvBlock(nn.Module):
    """DC-AE's residual conv block: conv3x3, SiLU, conv3x3 (no bias), RMSNorm, + input."""

    def __init__(self, channels: int, spatial_dims: int = 2):
        super().__init__()
        Conv = _conv(spatial_dims)
        self.conv1 = Conv(channels, channels, 3, padding=1)
        self.conv2 = Conv(channels, channels, 3, padding=1, bias=False)
        self.norm = RMSNorm(channels)

    def forward(self, x_bc: torch.Tensor) -> torch.Tensor:
        return x_bc + self.norm(self.conv2(F.silu(self.conv1(x_bc))))


class MLPBlock(nn.Module):
    """Per-position MLP with a residual: 1x1 up by ``expand_ratio``, SiLU, 1x1 down, RMSNorm."""

    def __init__(self, channels: int, expand_ratio: float = 4.0, spatial_dims: int = 2):
        super().__init__()
        Conv = _conv(spatial_dims)
        hidden = max(1, int(channels * expand_ratio))
        self.up = Conv(channels, hidden, 1)
        self.down = Conv(hidden, channels, 1, bias=False)
        self.norm = RMSNorm(channels)

    def forward(self, x_bc: torch.Tensor) -> torch.Tensor:
        return x_bc + self.norm(self.down(F.silu(self.up(x_bc))))


class _ShapeAdapter(nn.Module):
    """Accepts (B, C, L) in a 2-D rectifier by running it as (B, C, L, 1); checks the channel count."""

    channels: int
    spatial_dims: int

    def _check(self, x: torch.Tensor) -> tuple[torch.Tensor, bool]:
        if x.dim() < 3 or x.shape[1] != self.channels:
            raise ValueError(
                f"rectifier expects (B, {self.channels}, H, W) or (B, {self.channels}, L), "
                f"got {tuple(x.shape)}"
            )
        if self.spatial_dims == 2 and x.dim() == 3:
            return x.unsqueeze(-1), True
        if x.dim() != self.spatial_dims + 2:
            raise ValueError(
                f"rectifier built with spatial_dims={self.spatial_dims} got a {x.dim() - 2}-D latent "
                f"{tuple(x.shape)}; build it with spatial_dims={x.dim() - 2}"
            )
        return x, False


class Rectifier(_ShapeAdapter):
    """``x + head(blocks(stem(x)))``: the shared skeleton of the vit, cnn and mlp rectifiers.

    stem: conv C->W (kernel ``kernel``) plus a channel-repeat shortcut (input channel ``c * C // W`` feeds
    width channel c, i.e. ``repeat_interleave`` when W is a multiple of C); blocks: ``depth`` residual blocks
    of width W; head: RMSNorm, ReLU, conv W->C, zero-initialized (so the rectifier starts as the identity).
    """

    def __init__(
        self,
        channels: int,
        width: int,
        blocks: list[nn.Module],
        kernel: int = 3,
        spatial_dims: int = 2,
    ):
        super().__init__()
        Conv = _conv(spatial_dims)
        self.channels, self.width, self.spatial_dims = channels, width, spatial_dims
        self.stem = Conv(channels, width, kernel, padding=kernel // 2)
        self.register_buffer("repeat_idx", torch.arange(width) * channels // width, persistent=False)
        self.blocks = nn.Sequential(*blocks)
        self.norm = RMSNorm(width)
        self.head = Conv(width, channels, kernel, padding=kernel // 2)
        nn.init.zeros_(self.head.weight)
        nn.init.zeros_(self.head.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) or (B, C, L) -> same shape."""
        x_bc, squeeze = self._check(x)
        x_bc = x_bc.contiguous()  # the residual sum follows x's strides; keep the output plain
        h = self.stem(x_bc) + x_bc.index_select(1, self.repeat_idx)
        h = self.blocks(h)
        out = x_bc + self.head(F.relu(self.norm(h)))
        return out.squeeze(-1) if squeeze else out


class IdentityRectifier(_ShapeAdapter):
    """No rectifier: returns its input (after the same shape checks as the others)."""

    def __init__(self, channels: int, spatial_dims: int = 2):
        super().__init__()
        self.channels, self.spatial_dims = channels, spatial_dims

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self._check(x)
        return x


def build_rectifier(cfg: RectifierConfig, channels: int, spatial_dims: int = 2) -> nn.Module:
    """Build the rectifier named by ``cfg.type`` for latents with ``channels`` channels.

    The bridge from config to the plain-argument modules above: ``cfg`` is a
    :class:`~revq_ray.config.RectifierConfig` (or any object with its fields); nothing here imports it.

    ``spatial_dims`` = 2 for image latents (B, C, H, W) (also accepts (B, C, L) as (B, C, L, 1)); 1 for audio
    latents (B, C, L) with Conv1d throughout. The result maps its input to a tensor of the same shape.
    """
    if channels < 1:
        raise ValueError(f"channels={channels}: the latent needs at least one channel")
    _conv(spatial_dims)  # validates spatial_dims
    w, d = cfg.width, cfg.depth
    if cfg.type == "identity":
        return IdentityRectifier(channels, spatial_dims)
    if cfg.type == "vit":
        if w % cfg.head_dim:
            raise ValueError(f"rectifier.width={w} must be a multiple of rectifier.head_dim={cfg.head_dim}")
        blocks = [EfficientViTBlock(w, cfg.head_dim, cfg.expand_ratio, spatial_dims) for _ in range(d)]
        return Rectifier(channels, w, blocks, kernel=3, spatial_dims=spatial_dims)
    if cfg.type == "cnn":
        blocks = [ResConvBlock(w, spatial_dims) for _ in range(d)]
        return Rectifier(channels, w, blocks, kernel=3, spatial_dims=spatial_dims)
    if cfg.type == "mlp":
        blocks = [MLPBlock(w, cfg.expand_ratio, spatial_dims) for _ in range(d)]
        return Rectifier(channels, w, blocks, kernel=1, spatial_dims=spatial_dims)
    if cfg.type == "dcae":  # the ReVQ authors' decoder, key for key
        from revq_ray.core.rectifiers_published import DCAERectifier

        return DCAERectifier(channels, w, d, cfg.head_dim, spatial_dims=spatial_dims)
    raise ValueError(f"rectifier.type={cfg.type!r}: expected one of vit, cnn, mlp, identity, dcae")


def vit_param_count(
    channels: int,
    width: int,
    depth: int,
    head_dim: int = 32,
    expand_ratio: float = 4.0,
    spatial_dims: int = 2,
) -> int:
    """Closed-form parameter count of the ``vit`` rectifier (kernel sizes 3 and 5 per spatial dim)."""
    k3, k5 = 3**spatial_dims, 5**spatial_dims
    heads = width // head_dim
    inner = heads * head_dim
    hidden = max(1, int(width * expand_ratio))
    attn = (
        width * 3 * inner  # qkv
        + 3 * inner * k5  # depthwise aggregation
        + 3 * inner * head_dim  # per-head grouped 1x1 (3*heads groups of head_dim)
        + 2 * inner * width  # projection of both scales
        + 2 * width  # RMSNorm
    )
    ffn = width * 2 * hidden + 2 * hidden + 2 * hidden * k3 + 2 * hidden + hidden * width + 2 * width
    stem = channels * width * k3 + width
    head = 2 * width + width * channels * k3 + channels
    return stem + depth * (attn + ffn) + head
