"""load_vae spec parsing, diffusers adapters on tiny local models, and TAESD on the real shared taef2."""

from __future__ import annotations

import pytest
import torch

from revq_ray.vae import FrozenVAE, load_vae, parse_spec
from revq_ray.vae.images import psnr, read_idx_images, to_vae_input

pytestmark = pytest.mark.data


@pytest.mark.parametrize("spec", ["", "no-prefix", "vqgan:/tmp/x", "taesd:", "  :x"])
def test_bad_spec_lists_the_three_forms(spec):
    with pytest.raises(ValueError) as err:
        load_vae(spec)
    msg = str(err.value)
    for form in ("diffusers:<hub-id-or-dir>", "taesd:<dir>", "builtin:<dir>"):
        assert form in msg


def test_parse_spec_keeps_colons_in_target():
    assert parse_spec("diffusers:C:/models/vae") == ("diffusers", "C:/models/vae")
    assert parse_spec("BUILTIN:runs/x") == ("builtin", "runs/x")


def test_missing_targets_give_clear_errors(tmp_path):
    with pytest.raises(ValueError, match="no config.json"):
        load_vae(f"diffusers:{tmp_path}")
    with pytest.raises(ValueError, match="encoder"):
        load_vae(f"taesd:{tmp_path}")
    with pytest.raises(ValueError, match="revq_vae.json"):
        load_vae(f"builtin:{tmp_path}")
    with pytest.raises(ValueError, match="hub id"):
        load_vae("diffusers:not-a-dir-and-no-slash")


def _assert_frozen(vae):
    assert isinstance(vae, FrozenVAE)
    params = list(vae.module.parameters())
    assert params and all(not p.requires_grad for p in params)
    assert not any(m.training for m in vae.module.modules())


def test_diffusers_kl_and_tiny_roundtrip(tmp_path):
    from diffusers import AutoencoderKL, AutoencoderTiny

    torch.manual_seed(0)
    AutoencoderKL(
        block_out_channels=(8, 16),
        down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2,
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=8,
        sample_size=32,
    ).save_pretrained(tmp_path / "kl")
    AutoencoderTiny(
        encoder_block_out_channels=(8, 8, 8, 8),
        decoder_block_out_channels=(8, 8, 8, 8),
        num_encoder_blocks=(1, 1, 1, 1),
        num_decoder_blocks=(1, 1, 1, 1),
        latent_channels=4,
    ).save_pretrained(tmp_path / "tiny")
    x = torch.rand(2, 3, 32, 32)

    kl = load_vae(f"diffusers:{tmp_path / 'kl'}")  # image size from config sample_size
    _assert_frozen(kl)
    assert kl.is_gaussian and kl.modality == "image"
    assert kl.input_shape == (3, 32, 32) and kl.latent_shape == (4, 16, 16)
    z = kl.encode(x)
    assert z.shape == (2, 4, 16, 16)
    post = kl.posterior(x)
    assert post.mean.shape == post.logvar.shape == z.shape
    torch.testing.assert_close(post.mean, z)  # raw latents: the posterior mean, no scaling_factor
    y = kl.decode(z)
    assert y.shape == x.shape and y.min() >= 0.0 and y.max() <= 1.0

    tiny = load_vae(f"diffusers:{tmp_path / 'tiny'}", image_size=64)
    _assert_frozen(tiny)
    assert not tiny.is_gaussian
    assert tiny.input_shape == (3, 64, 64) and tiny.latent_shape == (4, 8, 8)
    z = tiny.encode(torch.rand(2, 3, 64, 64))
    assert z.shape == (2, 4, 8, 8)
    assert tiny.decode(z).shape == (2, 3, 64, 64)
    with pytest.raises(NotImplementedError, match="deterministic"):
        tiny.posterior(x)
    with pytest.raises(ValueError, match="multiple"):
        load_vae(f"diffusers:{tmp_path / 'tiny'}", image_size=60)


def test_taesd_taef2_reconstructs_fashion_mnist(shared_dir):
    vae = load_vae(f"taesd:{shared_dir / 'models' / 'taef2'}", image_size=64)
    _assert_frozen(vae)
    assert vae.latent_shape == (32, 8, 8) and not vae.is_gaussian
    images = read_idx_images(shared_dir / "data/fashion-mnist/train-images-idx3-ubyte.gz", limit=64)
    x = torch.stack([to_vae_input(im, 64) for im in images])
    assert x.shape == (64, 3, 64, 64) and torch.equal(x[:, 0], x[:, 2])
    z = vae.encode(x)
    assert z.shape == (64, 32, 8, 8)
    y = vae.decode(z)
    assert y.min() >= 0.0 and y.max() <= 1.0
    quality = psnr(x, y)
    print(f"taef2 round-trip PSNR on 64 Fashion-MNIST train images at 64x64: {quality:.2f} dB")
    assert quality >= 28.0


@pytest.mark.filterwarnings("ignore::FutureWarning")  # diffusers Oobleck uses the old weight_norm
def test_diffusers_dc_and_oobleck(tmp_path):
    from diffusers import AutoencoderDC, AutoencoderOobleck

    torch.manual_seed(0)
    AutoencoderDC(
        encoder_block_out_channels=(8, 16),
        decoder_block_out_channels=(8, 16),
        encoder_layers_per_block=(1, 1),
        decoder_layers_per_block=(1, 1),
        encoder_block_types="ResBlock",
        decoder_block_types="ResBlock",
        encoder_qkv_multiscales=((), ()),
        decoder_qkv_multiscales=((), ()),
        decoder_norm_types="rms_norm",
        decoder_act_fns="silu",
        attention_head_dim=8,
        latent_channels=4,
    ).save_pretrained(tmp_path / "dc")
    dc = load_vae(f"diffusers:{tmp_path / 'dc'}", image_size=32)
    assert not dc.is_gaussian and dc.latent_shape == (4, 16, 16)
    z = dc.encode(torch.rand(1, 3, 32, 32))
    assert z.shape == (1, 4, 16, 16) and dc.decode(z).shape == (1, 3, 32, 32)

    AutoencoderOobleck(
        encoder_hidden_size=8,
        downsampling_ratios=[2, 4],
        channel_multiples=[1, 2],
        decoder_channels=8,
        decoder_input_channels=4,
        audio_channels=2,
        sampling_rate=16000,
    ).save_pretrained(tmp_path / "oobleck")
    ob = load_vae(f"diffusers:{tmp_path / 'oobleck'}", audio_samples=800)
    assert ob.modality == "audio" and ob.input_kind == "waveform" and ob.sample_rate == 16000
    assert ob.is_gaussian and ob.input_shape == (2, 800) and ob.latent_shape == (4, 100)
    x = ob.wave_to_input(torch.randn(2, 795) * 0.1)
    assert x.shape == (2, 2, 800)  # mono copied to both channels, padded to a multiple of the hop (8)
    post = ob.posterior(x)
    assert post.mean.shape == post.logvar.shape == (2, 4, 100)
    wave = ob.output_to_wave(ob.decode(post.mean))
    assert wave.shape == (2, 800) and wave.abs().max() <= 1.0
