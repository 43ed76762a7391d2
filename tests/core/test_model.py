"""ReVQModel: encode/decode consistency, save/load round trips, loss routing, config validation."""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from revq_ray.config import ConfigError, ModelConfig
from revq_ray.core.model import ModelOut, ReVQModel, total_loss
from revq_ray.core.stats import RunningStats

pytestmark = pytest.mark.core

ROOT = Path(__file__).resolve().parents[2]
TYPES = ["revq", "vq", "simvq", "gq"]
IMAGE_SHAPE = [4, 4, 4]  # C, H, W: 64 values -> 16 tokens of d = 4
AUDIO_SHAPE = [8, 12]  # C, L: 96 values -> 24 tokens of d = 4


def _cfg(
    qtype: str = "revq", rect: str = "vit", tokens: int = 16, loss: str = "decoupled", **q
) -> ModelConfig:
    return ModelConfig.model_validate(
        {
            "quantizer": {"type": qtype, "tokens": tokens, "codebook_size": 8, "loss": loss, **q},
            "rectifier": {"type": rect, "width": 32, "depth": 1, "head_dim": 16, "expand_ratio": 2.0},
        }
    )


def _data(shape, n: int = 24, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Raw latents with non-trivial per-element mean/std, and a plausible log-variance."""
    g = torch.Generator().manual_seed(seed)
    mean = torch.randn(shape, generator=g)
    std = torch.rand(shape, generator=g) + 0.5
    z = mean + std * torch.randn(n, *shape, generator=g)
    logvar = torch.log(std**2 * 0.1) + 0.1 * torch.randn(n, *shape, generator=g)
    return z, logvar


def _model(
    qtype: str = "revq", shape=IMAGE_SHAPE, train_steps: int = 2, **kw
) -> tuple[ReVQModel, torch.Tensor, torch.Tensor]:
    """A fitted model (standardizer, codebook init, a few optimizer steps so nothing is at its init value)."""
    torch.manual_seed(0)
    z, logvar = _data(shape)
    model = ReVQModel.from_config(shape, _cfg(qtype, tokens=math.prod(shape) // 4, **kw))
    stats = RunningStats(shape).update(z)
    model.standardizer.set_stats(stats)
    model.init_codebook(z, generator=torch.Generator().manual_seed(0))
    groups = model.param_groups()
    params = groups["codebook"] + groups["rectifier"]
    if params and train_steps:
        opt = torch.optim.Adam(params, lr=1e-2)
        for _ in range(train_steps):
            out = model(z, logvar)
            opt.zero_grad()
            out.loss.backward()
            opt.step()
        model.zero_grad(set_to_none=True)
    return model, z, logvar


# ------------------------------------------------------------------------------------------ encode / decode
@pytest.mark.parametrize("shape", [IMAGE_SHAPE, AUDIO_SHAPE], ids=["image", "audio"])
@pytest.mark.parametrize("qtype", TYPES)
def test_decode_of_encode_equals_forward_in_eval(qtype, shape):
    model, z, logvar = _model(qtype, shape)
    model.eval()
    with torch.no_grad():
        out = model(z, logvar)
    ids = model.encode(z, logvar)
    assert ids.dtype == torch.int64 and ids.shape == (z.shape[0], model.tokens)
    assert int(ids.min()) >= 0 and int(ids.max()) < model.codebook_size
    assert torch.equal(ids, out.ids_bt)
    with torch.no_grad():
        rec = model.decode(ids)
    assert rec.shape == z.shape and rec.is_contiguous()
    assert torch.equal(rec, out.latents_rec)  # the same ops, bit for bit
    assert out.quantized.shape == out.rectified_std.shape == z.shape
    # quantize_only is the same quantized latent, de-standardized, without the rectifier.
    torch.testing.assert_close(
        model.quantize_only(z, logvar), model.standardizer.inverse(out.quantized), rtol=1e-6, atol=1e-5
    )


@pytest.mark.parametrize("rect", ["cnn", "mlp", "identity"])
@pytest.mark.parametrize("shape", [IMAGE_SHAPE, AUDIO_SHAPE], ids=["image", "audio"])
def test_other_rectifiers_in_the_model(rect, shape):
    model, z, _ = _model("revq", shape, rect=rect)
    model.eval()
    with torch.no_grad():
        out = model(z)
        assert torch.equal(model.decode(model.encode(z)), out.latents_rec)
    if rect == "identity":
        assert torch.equal(out.rectified_std, out.quantized)


def test_forward_outputs_and_losses():
    model, z, logvar = _model("revq")
    out = model(z)
    assert isinstance(out, ModelOut)
    assert "rect" in out.losses and len(out.losses) >= 2
    assert all(v.dim() == 0 and torch.isfinite(v) for v in out.losses.values())
    torch.testing.assert_close(out.loss, sum(out.losses.values()))
    torch.testing.assert_close(total_loss(out), out.loss)
    # rect is measured in standardized space against the standardized input.
    z_std = model.standardizer(z)
    torch.testing.assert_close(out.latents_std, z_std)
    torch.testing.assert_close(out.losses["rect"], torch.nn.functional.mse_loss(out.rectified_std, z_std))
    torch.testing.assert_close(out.latents_rec, model.standardizer.inverse(out.rectified_std))


def test_untrained_rectifier_is_identity():
    torch.manual_seed(0)
    z, _ = _data(IMAGE_SHAPE)
    model = ReVQModel.from_config(IMAGE_SHAPE, _cfg("revq"))
    model.standardizer.set_stats(RunningStats(IMAGE_SHAPE).update(z))
    model.init_codebook(z)
    model.eval()
    torch.testing.assert_close(model(z).latents_rec, model.quantize_only(z), rtol=0, atol=1e-5)


def test_encode_does_not_touch_training_state():
    model, z, logvar = _model("revq")
    model.train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    model.encode(z)
    model.quantize_only(z)
    assert model.quantizer.training  # mode restored
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_decode_rejects_bad_ids():
    model, z, _ = _model("revq", train_steps=0)
    ids = model.encode(z)
    with pytest.raises(ValueError, match="out of range"):
        model.decode(torch.full_like(ids, model.codebook_size))
    with pytest.raises(ValueError, match="out of range"):
        model.decode(ids - ids - 1)
    with pytest.raises(ValueError, match="expected"):
        model.decode(ids[:, :-1])
    with pytest.raises(TypeError, match="integer"):
        model.decode(ids.float())
    with pytest.raises(ValueError, match="expected"):
        model(z[:, :2])


def test_gq_quantizes_the_raw_posterior():
    """GQ's codebook is the VAE prior, so it sees the posterior in raw units: its ids do not depend on the
    standardizer, and the log-variance matters."""
    model, z, logvar = _model("gq", train_steps=0)
    model.eval()
    ids = model.encode(z, logvar)
    want = model.quantizer(model.layout.to_tokens(z), logvar_btd=model.layout.to_tokens(logvar)).ids_bt
    assert torch.equal(ids, want)
    other = ReVQModel.from_config(IMAGE_SHAPE, model.cfg)
    other.load_state_dict(model.state_dict())
    with torch.no_grad():
        other.standardizer.mean.add_(1.0)
        other.standardizer.std.mul_(3.0)
    other.eval()
    assert torch.equal(other.encode(z, logvar), ids)
    assert not torch.equal(model.encode(z, logvar + 4.0), ids)  # a wider posterior changes some ids
    # The rectifier still works in standardized units: quantized = standardized prior samples.
    out = model(z, logvar)
    torch.testing.assert_close(out.quantized, model.standardizer(model.quantize_only(z, logvar)))


# ------------------------------------------------------------------------------------------ gradients
def _grads(params) -> list[bool]:
    return [p.grad is not None and bool(p.grad.abs().sum() > 0) for p in params]


@pytest.mark.parametrize("qtype", ["revq", "vq", "simvq"])
def test_decoupled_losses_touch_disjoint_parameters(qtype):
    model, z, _ = _model(qtype, train_steps=1)
    groups = model.param_groups()
    assert groups["codebook"] and groups["rectifier"]
    out = model(z)
    out.losses["rect"].backward(retain_graph=True)
    assert all(_grads(groups["rectifier"][-2:]))  # at least the head gets gradient
    assert not any(_grads(groups["codebook"])), "decoupled: the rect loss must not reach the codebook"
    model.zero_grad(set_to_none=True)
    quant = sum(v for k, v in out.losses.items() if k != "rect")
    quant.backward()
    assert any(_grads(groups["codebook"]))
    assert not any(_grads(groups["rectifier"])), "decoupled: quantizer losses must not reach the rectifier"


@pytest.mark.parametrize("qtype", ["revq", "vq", "simvq"])
def test_joint_loss_reaches_the_codebook(qtype):
    """joint: the rectifier's loss flows through the code lookup into the quantizer's parameters too."""
    model, z, _ = _model(qtype, loss="joint", train_steps=1)
    groups = model.param_groups()
    out = model(z)
    out.losses["rect"].backward()
    assert any(_grads(groups["rectifier"]))
    assert any(_grads(groups["codebook"])), "joint: the reconstruction loss must reach the codebook"
    # and the joint model still decodes exactly what it encodes
    model.eval()
    with torch.no_grad():
        assert torch.equal(model.decode(model.encode(z)), model(z).latents_rec)


def test_param_groups_cover_every_trainable_parameter():
    for qtype in TYPES:
        model, _, _ = _model(qtype, train_steps=0)
        groups = model.param_groups()
        assert set(groups) == {"codebook", "rectifier"}
        ids = [id(p) for ps in groups.values() for p in ps]
        assert len(ids) == len(set(ids))
        assert set(ids) == {id(p) for p in model.parameters() if p.requires_grad}
        assert not list(model.standardizer.parameters())
    model, _, _ = _model("gq", rect="identity", train_steps=0)
    assert model.param_groups()["rectifier"] == []


def test_set_reduce_fn_forwards_to_quantizer():
    model, _, _ = _model("revq", train_steps=0)
    calls = []

    def fn(t):
        calls.append(t.shape)
        return t

    model.set_reduce_fn(fn)
    assert model.quantizer.reduce_fn is fn


# ------------------------------------------------------------------------------------------ properties/config
def test_properties():
    model = ReVQModel.from_config(
        [32, 8, 8],
        ModelConfig.model_validate({"rectifier": {"type": "identity"}, "quantizer": {"codebook_size": 16}}),
    )
    assert model.latent_shape == (32, 8, 8)
    assert model.tokens == 512 and model.codebook_size == 16
    assert model.bits_per_sample == 512 * 4
    assert model.layout.dim == 4


def test_invalid_model_config_rejected():
    with pytest.raises(ConfigError, match="quantizer.tokens"):
        ReVQModel(IMAGE_SHAPE, {"quantizer": {"tokens": 0}})
    with pytest.raises(ConfigError, match="codebook_size"):
        ReVQModel(IMAGE_SHAPE, {"quantizer": {"tokens": 16, "codebook_size": 1}})
    with pytest.raises(ConfigError, match="unknown key"):
        ReVQModel(IMAGE_SHAPE, {"quantizer": {"tokens": 16, "codebok_size": 8}})
    with pytest.raises(ConfigError, match="head_dim"):
        ReVQModel(IMAGE_SHAPE, {"quantizer": {"tokens": 16}, "rectifier": {"width": 48, "head_dim": 32}})
    with pytest.raises(ConfigError, match="type"):
        ReVQModel(IMAGE_SHAPE, {"quantizer": {"tokens": 16, "type": "fsq"}})
    with pytest.raises(ValueError, match="model.quantizer.tokens=24 does not divide"):
        ReVQModel(IMAGE_SHAPE, {"quantizer": {"tokens": 24}})
    with pytest.raises(ValueError, match="latent_shape"):
        ReVQModel([4, 4, 4, 4], {"quantizer": {"tokens": 16}})


# ------------------------------------------------------------------------------------------ save / load
@pytest.mark.parametrize("qtype", TYPES)
def test_save_pretrained_round_trip(qtype, tmp_path):
    model, z, logvar = _model(qtype)
    model.eval()
    ids = model.encode(z, logvar)
    with torch.no_grad():
        rec = model.decode(ids)
    model.save_pretrained(tmp_path)
    assert (tmp_path / "model.safetensors").is_file() and (tmp_path / "config.json").is_file()
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["latent_shape"] == IMAGE_SHAPE
    assert ModelConfig.model_validate(config["model"]) == model.cfg

    loaded = ReVQModel.from_pretrained(tmp_path)
    assert not loaded.training
    assert loaded.cfg == model.cfg and loaded.latent_shape == model.latent_shape
    # Every parameter and persistent buffer (standardizer, usage counts, method state) survives.
    want, got = model.state_dict(), loaded.state_dict()
    assert want.keys() == got.keys()
    for k in want:
        assert torch.equal(want[k], got[k]), k
    assert torch.equal(loaded.encode(z, logvar), ids)
    with torch.no_grad():
        assert torch.equal(loaded.decode(ids), rec)


def _fake_hub_cache(src: Path, cache: Path, repo_id: str) -> None:
    """Lay out a saved model as the Hugging Face hub cache would hold a downloaded repo."""
    rev = "0123456789abcdef0123456789abcdef01234567"
    repo = cache / f"models--{repo_id.replace('/', '--')}"
    (repo / "snapshots" / rev).mkdir(parents=True)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(rev)
    for name in ("config.json", "model.safetensors"):
        shutil.copy(src / name, repo / "snapshots" / rev / name)


def test_from_pretrained_offline_in_fresh_process(tmp_path):
    """With HF_HUB_OFFLINE=1 set before huggingface_hub is imported, loading works from a directory and from
    a repo id already in the hub cache (no network is touched: the machine has none)."""
    expected = {}
    for qtype in TYPES:
        model, z, logvar = _model(qtype)
        model.eval()
        model.save_pretrained(tmp_path / qtype)
        ids = model.encode(z, logvar)
        with torch.no_grad():
            expected[f"{qtype}.rec"] = model.decode(ids)
        expected[f"{qtype}.ids"] = ids
        expected[f"{qtype}.z"] = z
        expected[f"{qtype}.logvar"] = logvar
    save_file({k: v.contiguous() for k, v in expected.items()}, str(tmp_path / "expected.safetensors"))
    _fake_hub_cache(tmp_path / "revq", tmp_path / "hub", "local/revq-test")
    code = f"""
import torch
from huggingface_hub import constants
assert constants.HF_HUB_OFFLINE
from safetensors.torch import load_file
from revq_ray import ReVQModel
exp = load_file({str(tmp_path / "expected.safetensors")!r})
for q in {TYPES!r}:
    m = ReVQModel.from_pretrained({str(tmp_path)!r} + "/" + q)
    ids = m.encode(exp[q + ".z"], exp[q + ".logvar"])
    assert torch.equal(ids, exp[q + ".ids"]), q
    with torch.no_grad():
        assert torch.equal(m.decode(ids), exp[q + ".rec"]), q
m = ReVQModel.from_pretrained("local/revq-test", cache_dir={str(tmp_path / "hub")!r})
assert torch.equal(m.encode(exp["revq.z"]), exp["revq.ids"])
print("OFFLINE-OK")
"""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "OFFLINE-OK" in proc.stdout


def test_from_pretrained_never_unpickles(tmp_path):
    model, _, _ = _model("revq", train_steps=0)
    model.save_pretrained(tmp_path)
    weights = load_file(str(tmp_path / "model.safetensors"))
    # A pickle beside config.json is ignored: without model.safetensors loading fails loudly.
    torch.save(weights, tmp_path / "pytorch_model.bin")
    (tmp_path / "model.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="model.safetensors"):
        ReVQModel.from_pretrained(tmp_path)
    # Strict: a missing tensor is an error, not a silently random-initialized model.
    weights.pop(next(iter(weights)))
    save_file(weights, str(tmp_path / "model.safetensors"))
    with pytest.raises(RuntimeError, match="Missing"):
        ReVQModel.from_pretrained(tmp_path)


def test_from_pretrained_without_config_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="config.json"):
        ReVQModel.from_pretrained(tmp_path)
    with pytest.raises(FileNotFoundError, match="not a directory"):
        ReVQModel.from_pretrained(tmp_path / "no-such-dir")


def test_constructor_accepts_model_config_and_saves_full_config(tmp_path):
    cfg = _cfg("revq")
    a = ReVQModel(IMAGE_SHAPE, cfg)
    b = ReVQModel(IMAGE_SHAPE, {"quantizer": {"tokens": 16, "codebook_size": 8}})
    for m, d in [(a, tmp_path / "a"), (b, tmp_path / "b")]:
        m.save_pretrained(d)
        saved = json.loads((d / "config.json").read_text())
        # every field, defaults included; not init_from (how a run started, not part of the model)
        assert saved["model"] == m.cfg.model_dump(mode="json", exclude={"init_from"})


@pytest.mark.parametrize("umask", [0o022, 0o002])
def test_exports_follow_the_umask(tmp_path, umask):
    """Issue 25.6: an export (folder, model.safetensors, config.json) gets the modes a plain open()/mkdir()
    would give under the user's umask; safetensors alone writes 0600 and mkdtemp 0700."""
    from revq_ray.train.checkpoint import export_pretrained
    from revq_ray.vae.builtin import ImageConvVAE

    model = ReVQModel([4, 2, 2], {"quantizer": {"type": "vq", "tokens": 4, "codebook_size": 16}})
    old = os.umask(umask)
    try:
        out = export_pretrained(model, tmp_path / "run" / "export" / "latest")
        ImageConvVAE(image_size=16, width=8, latent_channels=4).save_pretrained(tmp_path / "vae")
    finally:
        os.umask(old)
    for p in [out, tmp_path / "vae"]:
        assert p.stat().st_mode & 0o777 == 0o777 & ~umask, p
        for f in p.iterdir():
            assert f.stat().st_mode & 0o777 == 0o666 & ~umask, f
    assert {f.name for f in out.iterdir()} >= {"model.safetensors", "config.json"}
