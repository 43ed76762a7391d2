"""Fixtures for the eval tier: a tiny built-in VAE, real photo crops and an (untrained) ReVQModel on them."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch


def photo_crops(n: int, size: int, seed: int = 0) -> np.ndarray:
    """``n`` real RGB crops (uint8, (n, size, size, 3)) from scikit-image's bundled photographs."""
    from PIL import Image
    from skimage import data

    rng = np.random.default_rng(seed)
    photos = [
        Image.fromarray(getattr(data, name)()).resize((96, 96)) for name in ("astronaut", "coffee", "chelsea")
    ]
    out = []
    for i in range(n):
        a = np.asarray(photos[i % len(photos)])
        y, x = rng.integers(0, 96 - size, 2)
        out.append(a[y : y + size, x : x + size])
    return np.stack(out)


@pytest.fixture(scope="module")
def tiny_assets(tmp_path_factory) -> dict:
    """A saved tiny ImageConvVAE (16x16 -> latent (4, 2, 2)) and a ReVQModel fitted to its latents.

    Returns paths (``vae_dir``, ``model_dir``), the VAE spec, the images and their latents.
    """
    from revq_ray.core.model import ReVQModel
    from revq_ray.vae.builtin import ImageConvVAE

    torch.manual_seed(0)
    root = tmp_path_factory.mktemp("tiny")
    vae = ImageConvVAE(image_size=16, width=8, latent_channels=4).eval()
    vae_dir = root / "vae"
    vae.save_pretrained(vae_dir)
    images = photo_crops(96, 16)
    x = torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255.0
    with torch.no_grad():
        latents = vae.encode(x)
    model = ReVQModel(
        [4, 2, 2],
        {
            "quantizer": {"type": "revq", "tokens": 4, "codebook_size": 16},
            "rectifier": {"type": "cnn", "width": 16, "depth": 1},
        },
    )
    model.standardizer.fit([latents])
    model.init_codebook(latents, generator=torch.Generator().manual_seed(0))
    model_dir = root / "model"
    model.eval().save_pretrained(model_dir)
    return {
        "root": root,
        "vae_dir": vae_dir,
        "vae_spec": f"builtin:{vae_dir}",
        "model_dir": model_dir,
        "images": images,
        "latents": latents,
    }


@pytest.fixture
def run_dir_from(tmp_path):
    """Make a training-run-shaped directory (export/best + a metrics CSV) around a saved model dir."""
    import shutil

    def make(model_dir: Path, vae_spec: str | None = None) -> Path:
        run = tmp_path / "run"
        shutil.copytree(model_dir, run / "export" / "best")
        lines = ["step,loss,loss_quant,rect,val_rect,usage,lr"]
        for s in range(0, 101, 10):
            loss, usage = 1 / (1 + s), min(1, 0.5 + s / 200)
            lines.append(f"{s},{loss:.4f},{loss / 2:.4f},{loss / 2:.4f},,{usage:.3f},1e-3")
            if s % 50 == 0:
                lines.append(f"{s},,,,{0.6 / (1 + s):.4f},,")
        (run / "metrics.csv").write_text("\n".join(lines) + "\n")
        if vae_spec:
            (run / "config.json").write_text(json.dumps({"name": "run", "vae": vae_spec}))
        return run

    return make
