"""TAESD-format tiny autoencoders (e.g. ``../shared/models/taef2``): encoder/decoder state dicts whose keys
are ``nn.Sequential`` indices.

Architecture (all convs 3x3, padding 1, unless stated), reimplemented from the format description::

    Block(x) = relu(conv.4(relu(conv.2(relu(conv.0(x))))) + x)
    with a mid-block GroupNorm branch first (encoder's last three blocks, decoder's first three; present
    when the checkpoint has ``*.pool.*`` keys, absent in the original 4-channel TAESD):
        x = x + pool.3(relu(pool.1(pool.0(x))))        # pool.0: 1x1 64->256, pool.1: GroupNorm(4, 256),
                                                       # pool.3: 1x1 256->64, both 1x1 without bias
    Encoder: conv(3,64), Block, [conv(s2, no bias), Block x3] x2, conv(s2, no bias), GN-Block x3, conv(64,C)
    Decoder: Clamp(tanh(x/3)*3), conv(C,64), ReLU, GN-Block x3, [Upsample(2), conv(no bias), Block x3] x2,
             Upsample(2), conv(no bias), Block, conv(64,3)

Images in [0, 1] -> raw latents (B, C, H/8, W/8); decode clamps to [0, 1]. Deterministic.
Checkpoints are read with ``torch.load(..., weights_only=True)`` and loaded strictly (a key or shape
mismatch is an error naming the file).
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from revq_ray.vae._adapter import FrozenAdapter

DEFAULT_IMAGE_SIZE = 256


def _conv(n_in: int, n_out: int, **kwargs) -> nn.Conv2d:
    return nn.Conv2d(n_in, n_out, 3, padding=1, **kwargs)


class Clamp(nn.Module):
    """Soft clamp to (-3, 3): keeps out-of-range latents (e.g. quantized ones) in the decoder's range."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.tanh(x / 3) * 3


class Block(nn.Module):
    def __init__(self, n: int = 64, midblock_gn: bool = False):
        super().__init__()
        self.conv = nn.Sequential(_conv(n, n), nn.ReLU(), _conv(n, n), nn.ReLU(), _conv(n, n))
        self.fuse = nn.ReLU()
        self.pool = None
        if midblock_gn:
            n_gn = 4 * n
            self.pool = nn.Sequential(
                nn.Conv2d(n, n_gn, 1, bias=False),
                nn.GroupNorm(4, n_gn),
                nn.ReLU(),
                nn.Conv2d(n_gn, n, 1, bias=False),
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.pool is not None:
            x = x + self.pool(x)
        return self.fuse(self.conv(x) + x)


def build_encoder(latent_channels: int = 32, width: int = 64, midblock_gn: bool = True) -> nn.Sequential:
    n, g = width, midblock_gn
    return nn.Sequential(
        _conv(3, n), Block(n),
        _conv(n, n, stride=2, bias=False), Block(n), Block(n), Block(n),
        _conv(n, n, stride=2, bias=False), Block(n), Block(n), Block(n),
        _conv(n, n, stride=2, bias=False), Block(n, g), Block(n, g), Block(n, g),
        _conv(n, latent_channels),
    )  # fmt: skip


def build_decoder(latent_channels: int = 32, width: int = 64, midblock_gn: bool = True) -> nn.Sequential:
    n, g = width, midblock_gn
    return nn.Sequential(
        Clamp(), _conv(latent_channels, n), nn.ReLU(), Block(n, g), Block(n, g), Block(n, g),
        nn.Upsample(scale_factor=2), _conv(n, n, bias=False), Block(n), Block(n), Block(n),
        nn.Upsample(scale_factor=2), _conv(n, n, bias=False), Block(n), Block(n), Block(n),
        nn.Upsample(scale_factor=2), _conv(n, n, bias=False), Block(n),
        _conv(n, 3),
    )  # fmt: skip


def _find(directory: Path, part: str) -> Path:
    preferred = sorted(directory.glob(f"*_{part}.pth"))
    found = preferred or sorted(directory.glob(f"*{part}*.pth"))
    if len(found) != 1:
        names = ", ".join(p.name for p in found) or "none"
        raise ValueError(
            f"taesd:{directory}: expected exactly one *{part}*.pth file (e.g. taef2_{part}.pth), "
            f"found: {names}"
        )
    return found[0]


def _load_state(path: Path) -> dict[str, torch.Tensor]:
    state = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ValueError(f"{path}: expected a plain state dict of tensors")
    return {k: v.float() for k, v in state.items()}


class TAESDVAE(FrozenAdapter):
    """A frozen TAESD-format autoencoder from a directory with ``*encoder*.pth`` and ``*decoder*.pth``."""

    def __init__(
        self, directory: str | Path, device: torch.device | str = "cpu", image_size: int | None = None
    ):
        directory = Path(directory).expanduser()
        if not directory.is_dir():
            raise ValueError(f"taesd:{directory}: not a directory (expected *encoder*.pth and *decoder*.pth)")
        enc_state = _load_state(_find(directory, "encoder"))
        dec_state = _load_state(_find(directory, "decoder"))
        latent_channels = int(enc_state["14.weight"].shape[0]) if "14.weight" in enc_state else 4
        width = int(enc_state["0.weight"].shape[0]) if "0.weight" in enc_state else 64
        # The original TAESD (SD 1.x/XL, 4 channels) has no mid-block GroupNorm; TAEF1/TAEF2-style ones do.
        enc_gn = any(".pool." in k for k in enc_state)
        dec_gn = any(".pool." in k for k in dec_state)
        encoder = build_encoder(latent_channels, width, enc_gn)
        decoder = build_decoder(latent_channels, width, dec_gn)
        for name, module, state in (("encoder", encoder, enc_state), ("decoder", decoder, dec_state)):
            try:
                module.load_state_dict(state, strict=True)
            except RuntimeError as err:
                raise ValueError(
                    f"taesd:{directory}: the {name} checkpoint does not match the TAESD format: {err}"
                ) from None
        super().__init__(nn.ModuleDict({"encoder": encoder, "decoder": decoder}), device)
        self.encoder, self.decoder = self.module["encoder"], self.module["decoder"]
        self.spec = f"taesd:{directory}"
        self.modality, self.input_kind, self.is_gaussian = "image", "image", False
        self.factor = 8
        image_size = DEFAULT_IMAGE_SIZE if image_size is None else int(image_size)
        if image_size % self.factor:
            raise ValueError(f"{self.spec}: image_size={image_size} must be a multiple of 8")
        self.input_shape = (3, image_size, image_size)
        self.latent_shape = (latent_channels, image_size // 8, image_size // 8)

    @torch.no_grad()
    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """Images (B, 3, H, W) in [0, 1], H and W multiples of 8 -> raw latents (B, C, H/8, W/8)."""
        return self.encoder(self._check_input(x))

    def decode_differentiable(self, z: torch.Tensor) -> torch.Tensor:
        """Raw latents -> images in [0, 1] (clamped); differentiable (``decode`` is this under no_grad)."""
        return self.decoder(self._check_latent(z)).clamp(0.0, 1.0)
