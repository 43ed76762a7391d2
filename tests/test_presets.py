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
    if path.name.startswith("prior_"):
        from revq_ray.prior.config import load_prior_config

        return load_prior_config(path)
    if path.name.startswith("vae_"):
        from revq_ray.vae.train import VAETrainConfig

        return load_config(path, cls=VAETrainConfig)
    return load_config(path)


def test_there_are_presets():
    names = {p.name for p in PRESETS}
    assert {"debug.yaml", "imagenet_512T.yaml", "imagenet_256T_B.yaml", "imagenet_256T_L.yaml"} <= names
    assert {"published_512T.yaml", "published_256T_B.yaml", "published_256T_L.yaml"} <= names
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
    assert cfg.data.shards == "synthetic"  # asks for synthetic latents by name (written once, reused)
    TokenLayout(t.synthetic_latent_shape, cfg.model.quantizer.tokens)
    steps = t.epochs * ((t.synthetic_items - cfg.data.val_items) // t.batch_size)
    assert steps <= 100 and math.prod(t.synthetic_latent_shape) <= 2048


def test_audio_preset_fits_the_mel_vae_latent():
    from revq_ray.vae.train import VAETrainConfig

    cfg: RunConfig = load_config(ROOT / "configs" / "audio_speech.yaml")
    vae = load_config(ROOT / "configs" / "vae_speech.yaml", cls=VAETrainConfig)
    frames = round(vae.crop_seconds * vae.sample_rate / vae.hop)  # about 128 frames, latent frames / 4
    TokenLayout([vae.latent_channels, frames // 4], cfg.model.quantizer.tokens)


# The authors' yaml of each published model (../shared/docs/PUBLISHED_REVQ_FORMAT.md): num_code, num_group,
# block_out_channels, layers_per_block.
AUTHORS = {"512T": (16384, 512, 512, 3), "256T_B": (65536, 256, 1024, 4), "256T_L": (262144, 256, 512, 4)}
SANA = "diffusers:mit-han-lab/dc-ae-f32c32-sana-1.1-diffusers"


@pytest.mark.parametrize("name", sorted(AUTHORS))
def test_published_presets_build_the_imported_models(name):
    """configs/published_*.yaml fine-tune an import-revq output: same shapes, the authors' VAE and crop."""
    from revq_ray.published import spec_from_yaml_dict

    k, g, width, depth = AUTHORS[name]
    authors = {
        "model": {
            "input_data_size": [32, 8, 8],
            "quantizer": {"TYPE": "vq", "num_code": k, "num_group": g, "tokens_per_data": g},
            "decoder": {"TYPE": "dc_ae", "in_channels": 32, "latent_channels": 32, "attention_head_dim": 32,
                        "block_type": ["EfficientViTBlock"], "block_out_channels": [width],
                        "layers_per_block": [depth], "qkv_multiscales": [[5]], "norm_type": "rms_norm"},
        }
    }  # fmt: skip
    imported = spec_from_yaml_dict(authors).model_config()
    path = ROOT / "configs" / f"published_{name}.yaml"
    cfg: RunConfig = load_config(path)
    m = cfg.model
    assert (m.quantizer.type, m.quantizer.tokens, m.quantizer.codebook_size) == ("revq", g, k)
    assert (m.rectifier.type, m.rectifier.width, m.rectifier.depth, m.rectifier.head_dim) == (
        imported["rectifier"]["type"], width, depth, imported["rectifier"]["head_dim"],
    )  # fmt: skip
    assert imported["quantizer"] == {"type": "revq", "tokens": g, "codebook_size": k}
    assert m.init_from.endswith(f"/models/revq-{name.replace('_', '-')}") and cfg.vae == SANA
    assert "--resize center_crop" in path.read_text() and "--image-size 256" in path.read_text()
    # The from-scratch presets of the same shapes use the authors' VAE and preprocessing too.
    scratch = ROOT / "configs" / f"imagenet_{name}.yaml"
    assert load_config(scratch).vae == SANA and "--resize center_crop" in scratch.read_text()
