"""The ReVQ authors' rectifier (their ``DCAEDecoder``), key for key: ``model.rectifier.type: dcae``.

The published ReVQ tokenizers (512T, 256T-B, 256T-L) rectify with a one-stage DC-AE decoder at latent
resolution, built from diffusers' ``EfficientViTBlock``. This module rebuilds exactly that network so that
their ``ckpt.pth`` ``"decoder"`` state dict loads here without renaming a key
(``docs/PUBLISHED_REVQ_FORMAT.md`` in ../shared lists them)::

    h = conv_in(x) + x.repeat_interleave(W // C, dim=1)     conv 3x3 C->W plus the channel-repeat shortcut
    h = up_blocks[0](h)                                      ``depth`` diffusers EfficientViTBlocks, in order
    h = ReLU(norm_out(h))                                    RMSNorm over channels (eps 1e-5, weight + bias)
    out = conv_out(h)                                        conv 3x3 W->C; no outer residual

It differs from :class:`revq_ray.core.rectifiers.Rectifier` (``type: vit``) on purpose: no ``x + f(x)``
around the whole network and no zero-initialized head (the authors train it from PyTorch's default init),
and other key names.

Pure PyTorch, like the rest of ``revq_ray.core`` (no diffusers import here): the blocks below re-implement
diffusers' ``EfficientViTBlock`` (``SanaMultiscaleLinearAttention`` with ``norm_type="rms_norm"`` and a
residual, then ``GLUMBConv`` with RMSNorm and a residual) op for op and with its parameter names, so
diffusers' own block loads their state dicts and agrees to float rounding
(``tests/core/test_published.py`` checks both against diffusers).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["DCAERectifier", "EfficientViTBlockDC"]


class RMSNormLast(nn.Module):
    """RMSNorm over the last dim with weight and bias (diffusers' ``RMSNorm(..., bias=True)``)."""

    def __init__(self, dim: int, eps: float = 1e-5):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))
        self.bias = nn.Parameter(torch.zeros(dim))

    def forward(self, x_last: torch.Tensor) -> torch.Tensor:
        variance = x_last.to(torch.float32).pow(2).mean(-1, keepdim=True)  # statistics in fp32 (bf16-safe)
        x_last = x_last * torch.rsqrt(variance + self.eps)
        if self.weight.dtype in (torch.float16, torch.bfloat16):
            x_last = x_last.to(self.weight.dtype)
        return x_last * self.weight + self.bias


def _norm_channels(norm: RMSNormLast, x_bchw: torch.Tensor) -> torch.Tensor:
    return norm(x_bchw.movedim(1, -1)).movedim(-1, 1)


class _MultiscaleProjection(nn.Module):
    """One extra scale of q/k/v: depthwise k x k conv, then a 1x1 conv grouped per head (no biases)."""

    def __init__(self, inner: int, heads: int, kernel_size: int):
        super().__init__()
        c = 3 * inner
        self.proj_in = nn.Conv2d(c, c, kernel_size, padding=kernel_size // 2, groups=c, bias=False)
        self.proj_out = nn.Conv2d(c, c, 1, 1, 0, groups=3 * heads, bias=False)

    def forward(self, qkv_bchw: torch.Tensor) -> torch.Tensor:
        return self.proj_out(self.proj_in(qkv_bchw))


class MultiscaleLinearAttention(nn.Module):
    """ReLU linear attention over all positions at several q/k/v scales, RMSNorm, plus the input.

    With no more positions than ``head_dim`` it switches to the quadratic form, as diffusers does.
    """

    def __init__(self, channels: int, head_dim: int = 32, kernel_sizes: Sequence[int] = (5,)):
        super().__init__()
        heads = channels // head_dim
        inner = heads * head_dim
        self.head_dim, self.eps = head_dim, 1e-15
        self.to_q = nn.Linear(channels, inner, bias=False)
        self.to_k = nn.Linear(channels, inner, bias=False)
        self.to_v = nn.Linear(channels, inner, bias=False)
        self.to_qkv_multiscale = nn.ModuleList(_MultiscaleProjection(inner, heads, k) for k in kernel_sizes)
        self.to_out = nn.Linear(inner * (1 + len(kernel_sizes)), channels, bias=False)
        self.norm_out = RMSNormLast(channels)

    def _attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, linear: bool) -> torch.Tensor:
        if linear:
            # out_n = sum_m v_m (k_m . q_n) / sum_m (k_m . q_n): a row of ones in V yields the normalizer.
            out = (F.pad(v, (0, 0, 0, 1), value=1.0) @ k.transpose(-1, -2)) @ q
            out = out.to(torch.float32)
            return out[:, :, :-1] / (out[:, :, -1:] + self.eps)
        scores = (k.transpose(-1, -2) @ q).to(torch.float32)
        scores = scores / (scores.sum(dim=2, keepdim=True) + self.eps)
        return v @ scores.to(v.dtype)

    def forward(self, x_bchw: torch.Tensor) -> torch.Tensor:
        b, _, h, w = x_bchw.shape
        linear = h * w > self.head_dim
        x_last = x_bchw.movedim(1, -1)
        qkv = torch.cat([self.to_q(x_last), self.to_k(x_last), self.to_v(x_last)], dim=3).movedim(-1, 1)
        qkv = torch.cat([qkv] + [proj(qkv) for proj in self.to_qkv_multiscale], dim=1)
        if linear:  # the normalizer sums over all positions: fp32 (as diffusers)
            qkv = qkv.to(torch.float32)
        q, k, v = qkv.reshape(b, -1, 3 * self.head_dim, h * w).chunk(3, dim=2)
        out = self._attend(F.relu(q), F.relu(k), v, linear)
        if linear:
            out = out.to(x_bchw.dtype)
        out = self.to_out(out.reshape(b, -1, h, w).movedim(1, -1)).movedim(-1, 1)
        return _norm_channels(self.norm_out, out) + x_bchw


class GLUMBConvDC(nn.Module):
    """Gated MBConv: 1x1 up to 2 x hidden, SiLU, depthwise 3x3, ``a * SiLU(gate)``, 1x1 down, RMSNorm,
    plus the input (diffusers' ``GLUMBConv`` with ``norm_type="rms_norm"``)."""

    def __init__(self, channels: int, expand_ratio: float = 4.0):
        super().__init__()
        hidden = int(expand_ratio * channels)
        self.conv_inverted = nn.Conv2d(channels, 2 * hidden, 1, 1, 0)
        self.conv_depth = nn.Conv2d(2 * hidden, 2 * hidden, 3, 1, 1, groups=2 * hidden)
        self.conv_point = nn.Conv2d(hidden, channels, 1, 1, 0, bias=False)
        self.norm = RMSNormLast(channels)

    def forward(self, x_bchw: torch.Tensor) -> torch.Tensor:
        h, gate = self.conv_depth(F.silu(self.conv_inverted(x_bchw))).chunk(2, dim=1)
        return _norm_channels(self.norm, self.conv_point(h * F.silu(gate))) + x_bchw


class EfficientViTBlockDC(nn.Module):
    """diffusers' ``EfficientViTBlock`` (rms_norm): ``attn`` (context), then ``conv_out`` (local)."""

    def __init__(self, channels: int, head_dim: int = 32, qkv_multiscales: Sequence[int] = (5,)):
        super().__init__()
        self.attn = MultiscaleLinearAttention(channels, head_dim, qkv_multiscales)
        self.conv_out = GLUMBConvDC(channels)

    def forward(self, x_bchw: torch.Tensor) -> torch.Tensor:
        return self.conv_out(self.attn(x_bchw))


class DCAERectifier(nn.Module):
    """The ReVQ authors' decoder at latent resolution (a state-dict-compatible ``DCAEDecoder``).

    Args:
        channels: latent channels C (in = out; 32 for DC-AE f32c32).
        width: block width W (``block_out_channels[0]``; 512 for 512T and 256T-L, 1024 for 256T-B). A
            multiple of ``channels`` (the shortcut repeats each input channel ``W // C`` times) and of
            ``head_dim``.
        depth: number of EfficientViT blocks (``layers_per_block[0]``; 3 for 512T, 4 for 256T-B/L).
        head_dim: attention head dimension (``attention_head_dim``; 32 in every published model).
        qkv_multiscales: kernel sizes of the multi-scale q/k/v aggregation (``qkv_multiscales[0]``).
        spatial_dims: 2 for image latents (B, C, H, W); 1 for (B, C, L) latents, which run as (B, C, L, 1)
            (the blocks are 2-D). Either way a (B, C, L) input is accepted.
    """

    def __init__(
        self,
        channels: int,
        width: int = 512,
        depth: int = 3,
        head_dim: int = 32,
        qkv_multiscales: Sequence[int] = (5,),
        spatial_dims: int = 2,
    ):
        super().__init__()
        if channels < 1 or width < 1 or depth < 0:
            raise ValueError(f"DCAERectifier: channels={channels}, width={width}, depth={depth} out of range")
        if width % channels:
            raise ValueError(
                f"rectifier.width={width} must be a multiple of the latent channels {channels} for "
                "type=dcae (its shortcut repeats every input channel width // channels times)"
            )
        if width % head_dim:
            raise ValueError(f"rectifier.width={width} must be a multiple of rectifier.head_dim={head_dim}")
        if spatial_dims not in (1, 2):
            raise ValueError(f"spatial_dims={spatial_dims}: expected 1 (B, C, L) or 2 (B, C, H, W)")
        self.channels, self.width, self.depth, self.spatial_dims = channels, width, depth, spatial_dims
        self.repeats = width // channels
        self.conv_in = nn.Conv2d(channels, width, 3, 1, 1)
        blocks = [EfficientViTBlockDC(width, head_dim, tuple(qkv_multiscales)) for _ in range(depth)]
        # One stage, as the authors' decoder with a single entry in block_out_channels: keys up_blocks.0.{i}.*
        self.up_blocks = nn.ModuleList([nn.Sequential(*blocks)])
        self.norm_out = RMSNormLast(width)
        self.conv_act = nn.ReLU()
        self.conv_out = nn.Conv2d(width, channels, 3, 1, 1)

    def _as_4d(self, x: torch.Tensor) -> tuple[torch.Tensor, bool]:
        if x.dim() not in (3, 4) or x.shape[1] != self.channels:
            raise ValueError(
                f"rectifier expects (B, {self.channels}, H, W) or (B, {self.channels}, L), "
                f"got {tuple(x.shape)}"
            )
        return (x.unsqueeze(-1), True) if x.dim() == 3 else (x, False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) or (B, C, L) -> same shape (the rectified latent, not a correction to add)."""
        x_bchw, squeeze = self._as_4d(x)
        h = self.conv_in(x_bchw) + x_bchw.repeat_interleave(self.repeats, dim=1)
        h = self.up_blocks[0](h)
        # RMSNorm normalizes the last dim: move channels last and back, as the authors' decoder does.
        h = _norm_channels(self.norm_out, h)
        out = self.conv_out(self.conv_act(h))
        return out.squeeze(-1) if squeeze else out

    def extra_repr(self) -> str:
        return f"channels={self.channels}, width={self.width}, depth={self.depth}"
