"""revq_ray.Tokenizer: media -> ids -> media with a built-in VAE, bundles that round-trip exactly."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

pytestmark = pytest.mark.eval


def test_public_export():
    import revq_ray
    from revq_ray.tokenizer import Tokenizer

    assert revq_ray.Tokenizer is Tokenizer


def test_encode_decode_and_input_forms(tiny_assets):
    from PIL import Image

    from revq_ray import Tokenizer

    tok = Tokenizer.build(tiny_assets["vae_spec"], tiny_assets["model_dir"])
    assert tok.modality == "image" and tok.tokens == 4 and tok.codebook_size == 16
    assert tok.bits_per_sample == 16.0
    images = tiny_assets["images"][:6]  # uint8 (B, H, W, 3)
    ids = tok.encode(images)
    assert ids.shape == (6, 4) and ids.dtype == torch.long
    assert int(ids.min()) >= 0 and int(ids.max()) < 16
    # The same images as a float BCHW tensor, a list of PIL images, and at another size (resized) agree.
    x = torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255.0
    assert torch.equal(tok.encode(x), ids)
    assert torch.equal(tok.encode([Image.fromarray(a) for a in images]), ids)
    assert tok.encode(images[0]).shape == (1, 4)
    big = np.stack([np.asarray(Image.fromarray(a).resize((32, 32))) for a in images])
    assert tok.encode(big).shape == (6, 4)
    # ids -> images
    rec = tok.decode(ids)
    assert rec.shape == (6, 3, 16, 16) and float(rec.min()) >= 0 and float(rec.max()) <= 1
    # decode is the model's forward path: latents of decode(ids) == forward(latents).latents_rec
    z = tok.vae.encode(x)
    with torch.no_grad():
        out = tok.model(z)
    assert torch.equal(out.ids_bt, ids)
    assert torch.allclose(tok.decode_latents(ids), out.latents_rec, atol=1e-6)
    with pytest.raises(ValueError, match="out of range"):
        tok.decode(torch.full((1, 4), 16))


def test_ids_stable_through_decode(tiny_assets):
    """Codes re-quantize to themselves: ids -> code latents -> encode gives the same ids."""
    from revq_ray import Tokenizer

    tok = Tokenizer.build(tiny_assets["vae_spec"], tiny_assets["model_dir"])
    ids = tok.encode_latents(tiny_assets["latents"])
    model = tok.model
    q_std = model.layout.to_latent(model.quantizer.codes(ids))
    assert torch.equal(tok.encode_latents(model.standardizer.inverse(q_std)), ids)
    # and decoding twice gives identical latents (inference does not touch training state)
    counts_before = {k: v.clone() for k, v in model.state_dict().items()}
    d1, d2 = tok.decode_latents(ids), tok.decode_latents(ids)
    assert torch.equal(d1, d2)
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in counts_before.items())


def test_identity_rectifier_decode_encode_is_exact(tiny_assets, tmp_path):
    from revq_ray import Tokenizer
    from revq_ray.core.model import ReVQModel

    model = ReVQModel(
        [4, 2, 2],
        {"quantizer": {"type": "vq", "tokens": 4, "codebook_size": 16}, "rectifier": {"type": "identity"}},
    )
    model.standardizer.fit([tiny_assets["latents"]])
    model.init_codebook(tiny_assets["latents"], generator=torch.Generator().manual_seed(1))
    model.eval().save_pretrained(tmp_path / "m")
    tok = Tokenizer.build(tiny_assets["vae_spec"], tmp_path / "m")
    ids = tok.encode(tiny_assets["images"][:16])
    assert torch.equal(tok.encode_latents(tok.decode_latents(ids)), ids)


def test_save_load_identical(tiny_assets, tmp_path):
    from revq_ray import Tokenizer

    tok = Tokenizer.build(tiny_assets["vae_spec"], tiny_assets["model_dir"])
    bundle = tok.save_pretrained(tmp_path / "bundle")
    cfg = json.loads((bundle / "tokenizer.json").read_text())
    assert cfg["format"] == "revq-ray-tokenizer" and cfg["vae"] == "builtin:bundle://vae"
    assert (bundle / "vae" / "model.safetensors").is_file() and (bundle / "model" / "config.json").is_file()
    # Self-contained: move the bundle away from the original VAE and delete nothing else it could lean on.
    moved = tmp_path / "elsewhere" / "tok"
    moved.parent.mkdir(parents=True)
    bundle.rename(moved)
    tok2 = Tokenizer.from_pretrained(moved)
    images = tiny_assets["images"][:8]
    ids = tok.encode(images)
    assert torch.equal(tok2.encode(images), ids)
    assert torch.allclose(tok2.decode(ids), tok.decode(ids), atol=1e-6)
    # re-saving a loaded bundle keeps it self-contained
    tok2.save_pretrained(tmp_path / "again")
    assert torch.equal(Tokenizer.from_pretrained(tmp_path / "again").encode(images), ids)


def test_from_pretrained_errors(tiny_assets, tmp_path):
    from revq_ray import Tokenizer

    with pytest.raises(FileNotFoundError, match="no trained model"):
        Tokenizer.from_pretrained(tmp_path)
    with pytest.raises(FileNotFoundError, match="vae="):
        Tokenizer.from_pretrained(tiny_assets["model_dir"])
    tok = Tokenizer.from_pretrained(tiny_assets["model_dir"], vae=tiny_assets["vae_spec"])
    assert tok.tokens == 4


def test_gq_tokenizer_uses_the_posterior(tiny_assets, tmp_path):
    from revq_ray import Tokenizer
    from revq_ray.core.model import ReVQModel

    model = ReVQModel(
        [4, 2, 2],
        {"quantizer": {"type": "gq", "tokens": 4, "codebook_size": 16}, "rectifier": {"type": "identity"}},
    )
    model.standardizer.fit([tiny_assets["latents"]])
    model.eval().save_pretrained(tmp_path / "gq")
    tok = Tokenizer.build(tiny_assets["vae_spec"], tmp_path / "gq")
    images = tiny_assets["images"][:8]
    ids = tok.encode(images)
    post = tok.vae.posterior(tok.preprocess(images))
    assert torch.equal(ids, model.encode(post.mean, post.logvar))
    assert tok.decode(ids).shape == (8, 3, 16, 16)


def test_tokenize_follows_encodes_skip_limit(tiny_assets, tmp_path):
    """Issue 25.5: `tokenize` fails (exit 1) above --max-skip-fraction of unreadable files, as `encode` does;
    the manifest is written either way and lists each skipped file."""
    from PIL import Image

    from revq_ray.cli import main as cli
    from revq_ray.tokenize import read_tokens

    src = tmp_path / "images"
    src.mkdir()
    for i, img in enumerate(tiny_assets["images"][:8]):
        Image.fromarray(img).save(src / f"ok{i}.png")
    for i in range(4):  # 4 of 12 unreadable (33%)
        (src / f"bad{i}.png").write_bytes(b"not a png")
    argv = ["--model", str(tiny_assets["model_dir"]), "--vae", tiny_assets["vae_spec"], "--input", str(src)]
    assert cli(["tokenize", *argv, "--output", str(tmp_path / "t1"), "--ray", "never"]) == 1
    manifest, _ = read_tokens(tmp_path / "t1")
    assert manifest["count"] == 8 and len(manifest["skipped"]) == 4
    # The flag raises the limit; 4 of 12 is then accepted.
    argv += ["--output", str(tmp_path / "t2"), "--ray", "never", "--max-skip-fraction", "0.5"]
    assert cli(["tokenize", *argv]) == 0
