"""Image front end: stretch (default) or center-crop non-square images to the VAE's square input."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from revq_ray.data.sources import decode_image
from revq_ray.vae.images import batch_to_vae_input, resize_square, to_vae_input

pytestmark = pytest.mark.core


def _banded(h: int, w: int) -> np.ndarray:
    """HxWx3 uint8: the central h x h square is gray 128, the side bands black (left) and white (right)."""
    img = np.full((h, w, 3), 128, np.uint8)
    side = (w - h) // 2
    img[:, :side] = 0
    img[:, w - side :] = 255
    return img


def test_center_crop_keeps_only_the_central_square():
    img = _banded(32, 64)  # the shorter side is already 32: a pure crop
    x = to_vae_input(img, 32, resize="center_crop")
    assert x.shape == (3, 32, 32)
    assert torch.allclose(x, torch.full_like(x, 128 / 255), atol=1e-6)  # no band survives the crop
    # When shrinking, the antialiasing filter blends a little of the bands into the border columns only.
    inner = to_vae_input(_banded(64, 128), 32, resize="center_crop")[:, :, 1:-1]
    assert torch.allclose(inner, torch.full_like(inner, 128 / 255), atol=1e-6)
    stretched = to_vae_input(img, 32)  # the default still stretches: both bands are in the picture
    assert stretched[:, :, 0].max() < 0.01 and stretched[:, :, -1].min() > 0.99


def test_center_crop_is_resize_shorter_side_then_central_square():
    gen = torch.Generator().manual_seed(0)
    x = torch.rand(2, 3, 96, 60, generator=gen)  # portrait: width is the shorter side
    want = F.interpolate(x, size=(64, 40), mode="bilinear", align_corners=False, antialias=True)[:, :, 12:52]
    assert torch.equal(resize_square(x, 40, "center_crop"), want)
    # square inputs: center_crop and stretch agree
    sq = torch.rand(1, 3, 50, 50, generator=gen)
    assert torch.equal(resize_square(sq, 32, "center_crop"), resize_square(sq, 32, "stretch"))
    batch = (np.random.default_rng(0).random((2, 30, 40, 3)) * 255).astype(np.uint8)
    assert batch_to_vae_input(batch, 16, "center_crop").shape == (2, 3, 16, 16)
    with pytest.raises(ValueError, match="resize='crop'"):
        resize_square(x, 40, "crop")


def test_encoded_files_can_be_center_cropped():
    import PIL.Image

    buf = io.BytesIO()
    PIL.Image.fromarray(_banded(20, 50)).save(buf, format="PNG")
    x = decode_image(buf.getvalue(), 20, "center_crop")
    assert x.shape == (3, 20, 20) and torch.allclose(x, torch.full_like(x, 128 / 255), atol=1e-6)


@pytest.mark.eval
@pytest.mark.shared
def test_tokenizer_bundle_keeps_its_resize_mode(shared_dir, tmp_path):
    """A bundle saved with center_crop (as import-revq writes) crops when loaded again; others stretch."""
    from revq_ray.core.model import ReVQModel
    from revq_ray.tokenizer import Tokenizer, image_resize_of
    from revq_ray.vae import load_vae

    vae = load_vae(f"taesd:{shared_dir / 'models' / 'taef2'}", image_size=64)
    model = ReVQModel(
        [32, 8, 8], {"quantizer": {"tokens": 512, "codebook_size": 4}, "rectifier": {"type": "identity"}}
    )
    tok = Tokenizer(vae, model)
    assert image_resize_of(tmp_path) == "stretch"
    tok.image_resize = "center_crop"
    tok.save_pretrained(tmp_path / "bundle")
    again = Tokenizer.from_pretrained(tmp_path / "bundle")
    assert again.image_resize == image_resize_of(tmp_path / "bundle") == "center_crop"
    img = _banded(64, 160)
    assert torch.equal(again.preprocess(img)[0], to_vae_input(img, 64, "center_crop"))
    assert not torch.equal(Tokenizer(vae, model).preprocess(img)[0], again.preprocess(img)[0])
