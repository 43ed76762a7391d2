"""Built-in Gaussian VAEs: short real training runs (loss falls) and save/load round-trips."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from revq_ray.config import ConfigError, load_config
from revq_ray.vae import load_vae
from revq_ray.vae.builtin import BUILTIN_FILE, ImageConvVAE, MelVAE
from revq_ray.vae.train import VAETrainConfig, train_vae

pytestmark = pytest.mark.data
CONFIGS = Path(__file__).resolve().parents[2] / "configs"


def _loss_fell(history: list[dict], key: str = "loss") -> tuple[float, float]:
    first = sum(h[key] for h in history[:3]) / 3
    last = sum(h[key] for h in history[-3:]) / 3
    return first, last


def test_image_vae_trains_on_fashion_mnist(shared_dir, tmp_path):
    cfg = VAETrainConfig(
        input=str(shared_dir / "data/fashion-mnist/train-images-idx3-ubyte.gz"),
        output=str(tmp_path / "img_vae"),
        limit=256,
        image_size=32,
        width=16,
        latent_channels=4,
        steps=30,
        batch_size=16,
        lr=3e-3,
        log_every=1,
        val_items=0,
        device="cpu",
    )
    out = train_vae(cfg)
    history = json.loads((out / "train_log.json").read_text())
    assert len(history) == 30
    first, last = _loss_fell(history)
    assert last < 0.7 * first, (first, last)
    vae = load_vae(f"builtin:{out}")
    assert vae.is_gaussian and vae.modality == "image" and vae.latent_shape == (4, 4, 4)


def test_mel_vae_trains_on_real_speech(shared_dir, tmp_path):
    cfg = VAETrainConfig(
        input=str(shared_dir / "data/speech16k"),
        modality="audio",
        output=str(tmp_path / "mel_vae"),
        limit=24,
        crop_seconds=0.37,  # 32 frames
        width=32,
        latent_channels=4,
        steps=30,
        batch_size=8,
        lr=3e-3,
        log_every=1,
        val_items=0,
        device="cpu",
    )
    assert cfg.crop_frames() == 32
    out = train_vae(cfg)
    history = json.loads((out / "train_log.json").read_text())
    first, last = _loss_fell(history)
    assert last < 0.7 * first, (first, last)

    vae = load_vae(f"builtin:{out}")
    assert vae.modality == "audio" and vae.input_kind == "mel"
    assert vae.input_shape == (80, 32) and vae.latent_shape == (4, 8)
    # The saved front end is the one trained with: same mel for the same audio.
    assert vae.front_end.config() == json.loads((out / "config.json").read_text())["front_end"]
    wave = torch.randn(2, 5000) * 0.1
    x = vae.wave_to_input(wave)
    assert x.shape == (2, 80, 20)  # 1 + 5000 // 256 = 20 frames, already a multiple of 4
    post = vae.posterior(x)
    assert post.mean.shape == post.logvar.shape == (2, 4, 5)
    assert vae.decode(post.mean).shape == (2, 80, 20)


def test_builtin_save_load_roundtrip_gives_identical_latents(tmp_path):
    torch.manual_seed(0)
    img = ImageConvVAE(image_size=32, width=16, latent_channels=4).eval()
    img.save_pretrained(tmp_path / "img")
    assert json.loads((tmp_path / "img" / BUILTIN_FILE).read_text())["class"] == "ImageConvVAE"
    vae = load_vae(f"builtin:{tmp_path / 'img'}")
    assert vae.spec == f"builtin:{tmp_path / 'img'}"
    assert all(not p.requires_grad for p in vae.module.parameters()) and not vae.module.training
    x = torch.rand(3, 3, 32, 32)
    with torch.no_grad():
        ref_mean, ref_logvar = img.encode_dist(x)
    assert torch.equal(vae.encode(x), ref_mean)
    assert torch.equal(vae.posterior(x).logvar, ref_logvar)
    assert load_vae(f"builtin:{tmp_path / 'img'}", image_size=64).latent_shape == (4, 8, 8)

    mel = MelVAE(n_mels=80, frames=32, width=32, latent_channels=4).eval()
    mel.save_pretrained(tmp_path / "mel")
    vae = load_vae(f"builtin:{tmp_path / 'mel'}", audio_samples=22050)
    assert vae.input_shape == (80, 88) and vae.latent_shape == (4, 22)  # 1 + 22050 // 256 = 87 -> 88
    m = torch.randn(2, 80, 32)
    with torch.no_grad():
        assert torch.equal(vae.encode(m), mel.encode(m))
    with pytest.raises(ValueError, match="multiples of 4"):
        vae.encode(torch.randn(1, 80, 30))


def test_presets_load_and_validate(tmp_path):
    for name in ("vae_fashion_mnist", "vae_speech"):
        cfg = load_config(CONFIGS / f"{name}.yaml", ["steps=5", f"output={tmp_path}"], cls=VAETrainConfig)
        assert cfg.steps == 5
    with pytest.raises(ConfigError, match="unknown key"):
        load_config(CONFIGS / "vae_speech.yaml", ["stepz=5"], cls=VAETrainConfig)
    with pytest.raises(ConfigError, match="multiple of"):
        load_config(
            CONFIGS / "vae_fashion_mnist.yaml", ["kl=target", "target_token_channels=3"], cls=VAETrainConfig
        )


def test_target_divergence_training_runs_and_logs_bits(shared_dir, tmp_path):
    cfg = VAETrainConfig(
        input=str(shared_dir / "data/fashion-mnist/train-images-idx3-ubyte.gz"),
        output=str(tmp_path / "gq_vae"),
        limit=128,
        image_size=16,
        width=8,
        latent_channels=4,
        kl="target",
        kl_weight=0.1,
        target_codebook_size=16,
        target_token_channels=2,
        steps=8,
        batch_size=8,
        log_every=4,
        val_items=16,
        device="cpu",
    )
    history = json.loads((train_vae(cfg) / "train_log.json").read_text())
    assert [h["step"] for h in history] == [1, 4, 8]
    for h in history:
        assert h["bits_mean"] >= 0 and h["lam"] > 0 and 0.0 <= h["frac_below"] <= 1.0
    # Tokens start far below log2(16) = 4 bits, so the global lam falls 1% per step.
    assert history[-1]["lam"] < history[0]["lam"]
