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
other key names, and the blocks are diffusers' own modules rather than a re-implementation, so the numerics
are the authors' by construction.

diffusers is imported lazily, inside the constructor: ``revq_ray.core`` still imports without it (and
without Ray, DeepSpeed or pydantic); only building a ``dcae`` rectifier needs it.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

__all__ = ["DCAERectifier"]


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
        # Lazy: diffusers is heavy and only this rectifier type needs it.
        from diffusers.models.autoencoders.autoencoder_dc import EfficientViTBlock
        from diffusers.models.normalization import RMSNorm

        self.channels, self.width, self.depth, self.spatial_dims = channels, width, depth, spatial_dims
        self.repeats = width // channels
        self.conv_in = nn.Conv2d(channels, width, 3, 1, 1)
        blocks = [
            EfficientViTBlock(
                width,
                attention_head_dim=head_dim,
                qkv_multiscales=tuple(qkv_multiscales),
                norm_type="rms_norm",
            )
            for _ in range(depth)
        ]
        # One stage, as the authors' decoder with a single entry in block_out_channels: keys up_blocks.0.{i}.*
        self.up_blocks = nn.ModuleList([nn.Sequential(*blocks)])
        self.norm_out = RMSNorm(width, 1e-5, elementwise_affine=True, bias=True)
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
        h = self.norm_out(h.movedim(1, -1)).movedim(-1, 1)
        out = self.conv_out(self.conv_act(h))
        return out.squeeze(-1) if squeeze else out

    def extra_repr(self) -> str:
        return f"channels={self.channels}, width={self.width}, depth={self.depth}"
