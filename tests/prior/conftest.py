"""Fixtures of the prior's tests: token datasets written here in the ``revq-ray-tokens`` format (version 2),
so these tests do not depend on ``revq-ray tokenize``; real ones are read by the same code."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest

CODEBOOKS_KEY = "codebooks_tkd"
CODEBOOKS_FILE = "codebooks.safetensors"
MANIFEST = "manifest.json"


def write_token_dir(
    out: str | Path,
    ids_nt: np.ndarray,
    *,
    codebook_size: int,
    labels: list[int] | None = None,
    class_names: list[str] | None = None,
    vocab: str = "per_position",
    codebooks_tkd: np.ndarray | None = None,
    flips: bool = False,
    tokenizer_model: str | None = None,
) -> Path:
    """Write a token dataset in the ``revq-ray-tokens`` format (version 2: ``vocab``, ``labels``,
    ``augment``, ``codebooks``) from per-position ids (N, T): ``ids/<key>.npy`` + ``manifest.json`` (+
    ``codebooks.safetensors``), as ``revq-ray tokenize`` writes it. ``flips`` adds for each item a copy marked
    ``"augment": "flip"`` with ``source_key`` (its ids are the original's reversed: not what a tokenizer gives
    for a flipped image; these tests only need the marking)."""
    out = Path(out)
    (out / "ids").mkdir(parents=True, exist_ok=True)
    n, T = ids_nt.shape
    dtype = np.uint16 if codebook_size * (T if vocab == "flat" else 1) <= 65536 else np.int32
    items = []

    def add(key: str, row: np.ndarray, extra: dict[str, Any]) -> None:
        a = row + (np.arange(T) * codebook_size if vocab == "flat" else 0)
        np.save(out / "ids" / f"{key}.npy", a.astype(dtype), allow_pickle=False)
        items.append({"key": key, "name": f"{key}.png", "shape": [T], "file": f"ids/{key}.npy", **extra})

    for i in range(n):
        extra = {} if labels is None else {"label": int(labels[i])}
        add(f"{i:08d}", ids_nt[i], extra)
        if flips:
            add(f"{i:08d}f", ids_nt[i][::-1].copy(), {**extra, "augment": "flip", "source_key": f"{i:08d}"})
    manifest: dict[str, Any] = {
        "format": "revq-ray-tokens",
        "version": 2,
        "tokenizer": {
            "model": tokenizer_model,
            "vae": None,
            "modality": "image",
            "tokens": T,
            "codebook_size": codebook_size,
            "sample_rate": None,
            "window_samples": None,
        },
        "vocab": vocab,
        "dtype": np.dtype(dtype).name,
        "count": len(items),
        "skipped": [],
        "shards": [],
        "augment": ["flip"] if flips else [],
        "items": items,
    }
    if labels is not None:
        manifest["labels"] = {
            "kind": "class",
            "names": class_names or [str(c) for c in range(max(labels) + 1)],
            "source": "test",
        }
    if codebooks_tkd is not None:
        import safetensors.numpy

        safetensors.numpy.save_file(
            {CODEBOOKS_KEY: np.ascontiguousarray(codebooks_tkd, np.float32)}, str(out / CODEBOOKS_FILE)
        )
        manifest["codebooks"] = CODEBOOKS_FILE
    (out / MANIFEST).write_text(json.dumps(manifest, indent=1))
    return out


def patterned_ids(n: int, T: int, K: int, classes: int, seed: int = 0) -> tuple[np.ndarray, list[int]]:
    """Ids a prior can learn: class c's images repeat a per-class pattern (position t -> (c * 3 + t) % K)
    with 10% of the ids random; labels cycle through the classes."""
    rng = np.random.default_rng(seed)
    labels = [i % classes for i in range(n)]
    ids = np.array([[(c * 3 + t) % K for t in range(T)] for c in labels], dtype=np.int64)
    noise = rng.random(ids.shape) < 0.1
    ids[noise] = rng.integers(0, K, int(noise.sum()))
    return ids, labels


@pytest.fixture
def token_dir(tmp_path) -> Path:
    """A labelled per-position token dataset: 96 images of T=8 ids, K=6, 3 classes, with flipped copies."""
    ids, labels = patterned_ids(96, 8, 6, 3)
    cb = np.random.default_rng(1).normal(size=(8, 6, 4)).astype(np.float32)
    return write_token_dir(
        tmp_path / "tokens",
        ids,
        codebook_size=6,
        labels=labels,
        class_names=["a", "b", "c"],
        codebooks_tkd=cb,
        flips=True,
    )


def _tiny_bundle(root: Path, codebook_size: int, seed: int) -> Path:
    """A Tokenizer bundle: a tiny built-in VAE (16x16 RGB -> latent (4, 2, 2)) and an untrained ReVQModel of
    4 tokens whose codebook is initialized from the VAE's latents of random images."""
    import torch

    from revq_ray.core.model import ReVQModel
    from revq_ray.tokenizer import Tokenizer
    from revq_ray.vae.builtin import ImageConvVAE

    torch.manual_seed(seed)
    vae = ImageConvVAE(image_size=16, width=8, latent_channels=4).eval()
    vae.save_pretrained(root / f"vae{seed}")
    with torch.no_grad():
        z = vae.encode(torch.rand(64, 3, 16, 16))
    model = ReVQModel(
        [4, 2, 2],
        {
            "quantizer": {"type": "revq", "tokens": 4, "codebook_size": codebook_size},
            "rectifier": {"type": "cnn", "width": 16, "depth": 1},
        },
    )
    model.standardizer.fit([z])
    model.init_codebook(z, generator=torch.Generator().manual_seed(seed))
    tok = Tokenizer.build(f"builtin:{root / f'vae{seed}'}", _save(model.eval(), root / f"model{seed}"))
    return tok.save_pretrained(root / f"tokenizer{seed}")


def _save(model: Any, path: Path) -> Path:
    model.save_pretrained(str(path))
    return path


@pytest.fixture(scope="module")
def tiny_tokenizers(tmp_path_factory) -> dict[str, Path]:
    """Three Tokenizer bundles: ``main`` (T=4, K=16), ``same_shape`` (T=4, K=16, other weights) and
    ``other_k`` (T=4, K=8)."""
    root = tmp_path_factory.mktemp("tokenizers")
    return {
        "main": _tiny_bundle(root, 16, 0),
        "same_shape": _tiny_bundle(root, 16, 1),
        "other_k": _tiny_bundle(root, 8, 2),
    }
