"""Every preset in configs/ loads and validates; the ImageNet presets carry the published numbers."""

from __future__ import annotations

import math
from pathlib import Path

import pytest

from revq_ray.config import RunConfig, load_config
from revq_ray.core.layout import TokenLayout

pytestmark = pytest.mark.core

ROOT = Path(__file__).resolve().parents[1]
PRESETS = sorted((ROOT / "configs").glob("*.yaml"))


def _load(path: Path):
    if path.name.startswith("vae_"):
        from revq_ray.vae.train import VAETrainConfig

        return load_config(path, cls=VAETrainConfig)
    return load_config(path)


def test_there_are_presets():
    names = {p.name for p in PRESETS}
    assert {"debug.yaml", "imagenet_512T.yaml", "imagenet_256T_B.yaml", "imagenet_256T_L.yaml"} <= names
    assert "audio_speech.yaml" in names


@pytest.mark.parametrize("path", PRESETS, ids=[p.name for p in PRESETS])
def test_preset_loads_and_documents_itself(path):
    cfg = _load(path)
    assert cfg is not None
    assert path.read_text().lstrip().startswith("#"), (
        f"{path.name}: start with a comment header saying what it is"
    )


# name -> (tokens, codebook size, rectifier width x depth, bits per image, global batch)
PUBLISHED = {
    "imagenet_512T.yaml": (512, 16384, 512, 3, 7168, 256),
    "imagenet_256T_B.yaml": (256, 65536, 1024, 4, 4096, 256),
    "imagenet_256T_L.yaml": (256, 262144, 512, 4, 4608, 128),
}


@pytest.mark.parametrize("name", sorted(PUBLISHED))
def test_imagenet_presets_match_the_published_configurations(name):
    tokens, k, width, depth, bits, batch = PUBLISHED[name]
    cfg: RunConfig = load_config(ROOT / "configs" / name)
    q, r, t = cfg.model.quantizer, cfg.model.rectifier, cfg.train
    assert (q.type, q.tokens, q.codebook_size, q.loss) == ("revq", tokens, k, "decoupled")
    assert (r.type, r.width, r.depth) == ("vit", width, depth)
    assert q.bits_per_sample == bits
    TokenLayout([32, 8, 8], q.tokens)  # DC-AE f32c32 latents at 256x256
    assert (t.batch_size, t.epochs, t.use_gpu, t.precision) == (batch, 100, True, "bf16")
    assert (t.lr, t.rectifier_lr_scale, t.rectifier_weight_decay, t.final_lr_fraction, t.grad_clip) == (
        0.01, 0.05, 1e-4, 0.05, 1.0,
    )  # fmt: skip
    assert q.reset.enabled and (q.reset.unit, q.reset.interval, q.reset.ratio, q.reset.noise) == (
        "epochs",
        1,
        0.2,
        0.1,
    )


def test_debug_preset_is_tiny_and_runs_anywhere():
    cfg: RunConfig = load_config(ROOT / "configs" / "debug.yaml")
    t = cfg.train
    assert (t.num_workers, t.use_gpu, t.precision) == (1, False, "fp32")
    assert t.synthetic_items > 0  # writes synthetic shards where data.shards points when none are there
    TokenLayout(t.synthetic_latent_shape, cfg.model.quantizer.tokens)
    steps = t.epochs * ((t.synthetic_items - cfg.data.val_items) // t.batch_size)
    assert steps <= 100 and math.prod(t.synthetic_latent_shape) <= 2048


def test_audio_preset_fits_the_mel_vae_latent():
    from revq_ray.vae.train import VAETrainConfig

    cfg: RunConfig = load_config(ROOT / "configs" / "audio_speech.yaml")
    vae = load_config(ROOT / "configs" / "vae_speech.yaml", cls=VAETrainConfig)
    frames = round(vae.crop_seconds * vae.sample_rate / vae.hop)  # about 128 frames, latent frames / 4
    TokenLayout([vae.latent_channels, frames // 4], cfg.model.quantizer.tokens)
