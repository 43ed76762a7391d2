"""Image input helpers shared by the VAE adapters, VAE training and the encode pipeline.

Every image VAE here takes (B, 3, S, S) float in [0, 1]; adapters map that to their own range.
"""

from __future__ import annotations

import gzip
import os
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".webp", ".gif", ".tif", ".tiff")
_IDX_UBYTE = 0x08


def read_idx_images(path: str | Path, limit: int | None = None) -> np.ndarray:
    """Read an IDX3 unsigned-byte image file (Fashion-MNIST / MNIST ``*-images-idx3-ubyte[.gz]``).

    Returns a uint8 array (N, H, W); ``limit`` keeps the first N images.
    """
    path = Path(path)
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as f:
        header = f.read(16)
        if len(header) < 16 or header[0] != 0 or header[1] != 0 or header[2] != _IDX_UBYTE or header[3] != 3:
            raise ValueError(
                f"{path}: not an IDX3 unsigned-byte image file (magic {header[:4].hex()}; expected 00000803)"
            )
        n, h, w = (int.from_bytes(header[4 + 4 * i : 8 + 4 * i], "big") for i in range(3))
        if limit is not None:
            n = min(n, int(limit))
        data = f.read(n * h * w)
    if len(data) < n * h * w:
        raise ValueError(f"{path}: truncated IDX file ({len(data)} bytes for {n} images of {h}x{w})")
    return np.frombuffer(data, np.uint8).reshape(n, h, w).copy()


# Images above this many pixels are refused from their header, before decoding (a 10000x10000 RGB image
# would take ~3 GB of RAM in float); JPEGs are first decoded at a reduced scale (PIL's draft mode).
MAX_IMAGE_PIXELS = int(os.environ.get("REVQ_MAX_IMAGE_PIXELS", str(64 * 2**20)))


def open_image_capped(fp, size: int | None = None, max_pixels: int | None = None):
    """``PIL.Image.open(fp)``, fully loaded, with a pixel cap. With ``size`` a JPEG is decoded at the
    smallest DCT scale that keeps both sides >= ``size`` (draft mode). An image still above ``max_pixels``
    (default ``MAX_IMAGE_PIXELS``, env ``REVQ_MAX_IMAGE_PIXELS``) raises ``ValueError`` before decoding."""
    import PIL.Image

    cap = MAX_IMAGE_PIXELS if max_pixels is None else max_pixels
    img = PIL.Image.open(fp)
    try:
        if size and img.format == "JPEG":
            img.draft("RGB", (size, size))
        w, h = img.size
        if w * h > cap:
            raise ValueError(
                f"image of {w}x{h} = {w * h / 1e6:.0f} MP is over the cap of {cap / 1e6:.0f} MP: not decoded "
                "(raise REVQ_MAX_IMAGE_PIXELS to allow it)"
            )
        img.load()  # force the full decode here: truncated files fail now, not later
    except BaseException:
        img.close()
        raise
    return img


RESIZE_MODES = ("stretch", "center_crop")


def resize_square(x_bchw: torch.Tensor, size: int, resize: str = "stretch") -> torch.Tensor:
    """(B, C, H, W) -> (B, C, size, size), bilinear (antialiased when shrinking).

    ``stretch``: both sides to ``size`` (non-square images are distorted). ``center_crop``: the shorter side
    to ``size`` keeping the aspect ratio, then the central ``size`` x ``size`` (torchvision's Resize(size) +
    CenterCrop(size), which is how ImageNet tokenizers such as the published ReVQ models were fed).
    """
    if resize not in RESIZE_MODES:
        raise ValueError(f"resize={resize!r}: choose one of {RESIZE_MODES}")
    h, w = x_bchw.shape[-2:]
    if resize == "center_crop" and h != w:
        # Shorter side -> size, the longer one scaled and truncated as torchvision does.
        th, tw = (size, int(size * w / h)) if h <= w else (int(size * h / w), size)
        x_bchw = _bilinear(x_bchw, th, tw)
        top, left = int(round((th - size) / 2.0)), int(round((tw - size) / 2.0))
        return x_bchw[..., top : top + size, left : left + size]
    return _bilinear(x_bchw, size, size)


def _bilinear(x_bchw: torch.Tensor, th: int, tw: int) -> torch.Tensor:
    if x_bchw.shape[-2:] == (th, tw):
        return x_bchw
    shrink = x_bchw.shape[-1] > tw or x_bchw.shape[-2] > th
    return F.interpolate(x_bchw, size=(th, tw), mode="bilinear", align_corners=False, antialias=shrink)


def to_vae_input(image, size: int, resize: str = "stretch") -> torch.Tensor:
    """One image -> float tensor (3, size, size) in [0, 1].

    Accepts a uint8 (or float in [0, 1]) array HxW (gray) or HxWx3 / HxWx4 (RGB[A]), a torch tensor of the
    same layouts, or a PIL image. Gray is replicated to RGB, alpha dropped; resized to a square ``size`` by
    :func:`resize_square` (``resize="stretch"``, the default, or ``"center_crop"``).
    """
    if hasattr(image, "convert") and hasattr(image, "size"):  # PIL.Image without importing PIL here
        image = np.asarray(image.convert("RGB"))
    arr = image.detach().cpu().numpy() if isinstance(image, torch.Tensor) else np.asarray(image)
    if arr.ndim == 3 and arr.shape[-1] == 1:
        arr = arr[..., 0]
    if arr.ndim == 3 and arr.shape[-1] == 4:
        arr = arr[..., :3]
    if arr.ndim not in (2, 3) or (arr.ndim == 3 and arr.shape[-1] != 3):
        raise ValueError(f"to_vae_input: expected HxW, HxWx3 or HxWx4, got shape {arr.shape}")
    if arr.dtype == np.uint8:
        x = torch.from_numpy(arr.astype(np.float32) / 255.0)
    else:
        x = torch.from_numpy(arr.astype(np.float32)).clamp(0.0, 1.0)
    x = x[None].expand(3, -1, -1) if x.dim() == 2 else x.permute(2, 0, 1)
    x = resize_square(x[None], size, resize)[0]
    return x.clamp(0.0, 1.0).contiguous()


def batch_to_vae_input(images_nhw: np.ndarray, size: int, resize: str = "stretch") -> torch.Tensor:
    """A uint8 batch (N, H, W) or (N, H, W, 3) -> (N, 3, size, size) in [0, 1], resized in one call."""
    x = torch.from_numpy(np.ascontiguousarray(images_nhw)).float() / 255.0
    x = x[:, None].expand(-1, 3, -1, -1) if x.dim() == 3 else x.permute(0, 3, 1, 2)
    return resize_square(x, size, resize).clamp(0.0, 1.0).contiguous()


def list_image_files(root: str | Path) -> list[Path]:
    """All image files under ``root`` (recursive, sorted), by extension."""
    root = Path(root)
    if root.is_file():
        return [root]
    return sorted(p for p in root.rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file())


def psnr(x: torch.Tensor, y: torch.Tensor, max_val: float = 1.0) -> float:
    """Mean-squared-error PSNR in dB over the whole batch (inputs in [0, max_val])."""
    mse = F.mse_loss(x.float(), y.float()).item()
    return float("inf") if mse == 0 else 10.0 * float(np.log10(max_val**2 / mse))
