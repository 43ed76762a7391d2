"""The ReVQ authors' published checkpoints: import, equality with the raw tensors, errors, export round trip.

Each test writes checkpoints in the published layout itself (``ckpt.pth`` + ``512T_NC=16384.yaml`` + a
statistics file; random weights, the published widths and depths, K reduced), with the decoder built by
diffusers' own DC-AE ``Decoder`` (what the authors' ``DCAEDecoder`` is), so nothing here comes from the
code under test. Reference ids and rectifier outputs are computed in this file from the raw tensors.
"""

from __future__ import annotations

import argparse
import json
import math
import re
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
import yaml
from safetensors.torch import save_file

from revq_ray.cli import main as cli
from revq_ray.published import DCAE_VAE_SPEC, PublishedFormatError, export_revq, import_revq

pytestmark = pytest.mark.core

# name -> (groups G, codes K (reduced from 16,384 / 65,536 / 262,144), decoder width, depth)
SHAPES = {"512T": (512, 64, 512, 3), "256T-B": (256, 32, 1024, 4), "256T-L": (256, 128, 512, 4)}
LATENT = (32, 8, 8)


def _yaml(g: int, k: int, width: int, depth: int, **extra_q) -> dict:
    return {
        "model": {
            "input_data_size": list(LATENT),
            "quantizer": {"TYPE": "vq", "num_code": k, "num_group": g, "tokens_per_data": g, **extra_q},
            "decoder": {
                "TYPE": "dc_ae",
                "in_channels": 32,
                "latent_channels": 32,
                "attention_head_dim": 32,
                "block_type": ["EfficientViTBlock"],
                "block_out_channels": [width],
                "layers_per_block": [depth],
                "qkv_multiscales": [[5]],
                "norm_type": "rms_norm",
                "act_fn": "silu",
                "upsample_block_type": "interpolate",
            },  # fmt: skip
        }
    }


def _decoder(width: int, depth: int, seed: int):
    """diffusers' DC-AE Decoder at latent resolution (the authors' rectifier), every tensor randomized."""
    from diffusers.models.autoencoders.autoencoder_dc import Decoder

    torch.manual_seed(seed)
    dec = Decoder(
        in_channels=32, latent_channels=32, attention_head_dim=32, block_type="EfficientViTBlock",
        block_out_channels=(width,), layers_per_block=(depth,), qkv_multiscales=((5,),), norm_type="rms_norm",
        act_fn="silu", upsample_block_type="interpolate", in_shortcut=True,
    )  # fmt: skip
    with torch.no_grad():  # norms start at weight 1 / bias 0: perturb everything so every tensor matters
        for p in dec.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return dec.eval()


def write_published(root: Path, name: str = "512T", seed: int = 0, shape=None) -> dict:
    """ckpt.pth, the yaml and stats.safetensors in ``root``; returns the raw tensors and the paths."""
    g, k, width, depth = shape or SHAPES[name]
    d = math.prod(LATENT) // g
    dec = _decoder(width, depth, seed)
    gen = torch.Generator().manual_seed(seed)
    emb = torch.randn(g, k, d, generator=gen)
    emb[:, 5] = emb[:, 2]  # exact duplicates: a tie that must go to the lower index (2)
    ckpt = {
        "decoder": dec.state_dict(),
        "quantizer": {
            "embeddings": emb,
            "count": torch.randint(0, 9, (g, k), generator=gen).float(),
            "index_offset": torch.arange(g) * k,
        },
    }
    root.mkdir(parents=True, exist_ok=True)
    torch.save(ckpt, root / "ckpt.pth")
    (root / "512T_NC=16384.yaml").write_text(yaml.safe_dump(_yaml(g, k, width, depth)))
    mean = torch.randn(math.prod(LATENT), generator=gen)
    std = torch.rand(math.prod(LATENT), generator=gen) + 0.5
    save_file({"mean": mean, "std": std}, str(root / "stats.safetensors"))
    return {"ckpt": ckpt, "decoder": dec, "mean": mean.view(LATENT), "std": std.view(LATENT), "root": root}


def _args(root: Path, out: Path) -> list[str]:
    return ["--checkpoint", str(root / "ckpt.pth"), "--config", str(root / "512T_NC=16384.yaml"),
            "--stats", str(root / "stats.safetensors"), "--output", str(out)]  # fmt: skip


def reference_ids(z_raw: torch.Tensor, raw: dict) -> torch.Tensor:
    """Nearest code per token from the raw tensors: standardize, view(B, -1, d), Euclidean, lowest index."""
    emb = raw["ckpt"]["quantizer"]["embeddings"].double()  # (G, K, d)
    tokens = ((z_raw.double() - raw["mean"].double()) / raw["std"].double()).reshape(
        z_raw.shape[0], -1, emb.shape[-1]
    )
    dist = torch.cdist(tokens.transpose(0, 1), emb)  # (G, B, K)
    return dist.argmin(-1).T  # argmin returns the first minimum: ties go to the lowest index


def reference_rectifier(x: torch.Tensor, sd: dict, width: int, depth: int) -> torch.Tensor:
    """The authors' decoder forward, written out from the raw state dict (blocks: diffusers' own)."""
    from diffusers.models.autoencoders.autoencoder_dc import EfficientViTBlock

    h = F.conv2d(x, sd["conv_in.weight"], sd["conv_in.bias"], padding=1)
    h = h + x.repeat_interleave(width // x.shape[1], dim=1)
    for i in range(depth):
        block = EfficientViTBlock(width, attention_head_dim=32, qkv_multiscales=(5,), norm_type="rms_norm")
        prefix = f"up_blocks.0.{i}."
        block.load_state_dict(
            {k[len(prefix) :]: v for k, v in sd.items() if k.startswith(prefix)}, strict=True
        )
        h = block.eval()(h)
    h_last = h.movedim(1, -1)  # RMSNorm over channels, eps 1e-5, with weight and bias
    h_last = h_last * torch.rsqrt(h_last.pow(2).mean(-1, keepdim=True) + 1e-5)
    h = (h_last * sd["norm_out.weight"] + sd["norm_out.bias"]).movedim(-1, 1)
    return F.conv2d(F.relu(h), sd["conv_out.weight"], sd["conv_out.bias"], padding=1)


@pytest.mark.parametrize(
    "name", ["512T", pytest.param("256T-B", marks=pytest.mark.slow), "256T-L"]
)  # 256T-B: a 73 M-parameter decoder, written, imported and run (about a minute on two busy cores)
def test_import_equals_the_raw_tensors(tmp_path, name):
    from revq_ray.core.model import ReVQModel

    raw = write_published(tmp_path / "pub", name)
    g, k, width, depth = SHAPES[name]
    assert cli(["import-revq", *_args(tmp_path / "pub", tmp_path / "out")]) == 0
    # A Tokenizer bundle, safetensors only, pointing at the authors' VAE with their preprocessing.
    files = {p.name for p in (tmp_path / "out").rglob("*") if p.is_file()}
    assert {"config.json", "model.safetensors", "tokenizer.json"} <= files
    assert not [f for f in files if f.endswith((".pth", ".pt", ".bin", ".pkl"))], files
    tok_cfg = json.loads((tmp_path / "out" / "tokenizer.json").read_text())
    assert (tok_cfg["vae"], tok_cfg["image_size"], tok_cfg["image_resize"]) == (
        DCAE_VAE_SPEC,
        256,
        "center_crop",
    )
    assert (tok_cfg["tokens"], tok_cfg["codebook_size"], tok_cfg["rectifier"]) == (g, k, "dcae")
    model = ReVQModel.from_pretrained(str(tmp_path / "out" / "model"))

    gen = torch.Generator().manual_seed(1)
    z = raw["mean"] + raw["std"] * torch.randn(4, *LATENT, generator=gen)
    # Tokens 0..G-1 of the last latent sit exactly on code 2 (= code 5): the tie must resolve to 2.
    d = math.prod(LATENT) // g
    z[-1] = raw["ckpt"]["quantizer"]["embeddings"][:, 2].reshape(LATENT) * raw["std"] + raw["mean"]
    ids = model.encode(z)
    want = reference_ids(z, raw)
    assert torch.equal(ids, want)
    assert (ids[-1] == 2).all(), f"tie at token dim {d} not resolved to the lowest index"

    q_std = raw["ckpt"]["quantizer"]["embeddings"][torch.arange(g), want].reshape(-1, *LATENT)
    with torch.no_grad():
        ref = reference_rectifier(q_std, raw["ckpt"]["decoder"], width, depth)
        assert (raw["decoder"](q_std) - ref).abs().max() < 1e-5  # the test's own forward is the decoder's
        got = model.rectifier(q_std)
        assert (got - ref).abs().max().item() < 1e-5
        rec = model.decode(ids)
    assert (rec - (ref * raw["std"] + raw["mean"])).abs().max().item() < 1e-4
    assert torch.equal(model.quantizer.counts, raw["ckpt"]["quantizer"]["count"].long())


def test_export_round_trip(tmp_path):
    from revq_ray.core.model import ReVQModel

    raw = write_published(tmp_path / "pub", "512T", seed=3, shape=(512, 16, 64, 1))
    bundle = _import(tmp_path / "pub", tmp_path / "bundle")
    assert cli(["export-revq", "--model", str(bundle), "--output", str(tmp_path / "exp")]) == 0
    back = torch.load(tmp_path / "exp" / "ckpt.pth", map_location="cpu", weights_only=True)
    assert back.keys() == {"decoder", "quantizer"}
    for part in ("decoder", "quantizer"):
        assert back[part].keys() == raw["ckpt"][part].keys()
        for key, t in raw["ckpt"][part].items():
            assert back[part][key].dtype == t.dtype and torch.equal(back[part][key], t), (part, key)
    assert yaml.safe_load((tmp_path / "exp" / "512T_NC=16384.yaml").read_text()) == _yaml(512, 16, 64, 1)
    # ... and the export imports again to the same model (its stats file is found in the directory)
    again = import_revq(tmp_path / "again", str(tmp_path / "exp"))
    a = ReVQModel.from_pretrained(str(bundle / "model")).state_dict()
    b = ReVQModel.from_pretrained(str(again / "model")).state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_export_refuses_what_the_authors_code_cannot_load(tmp_path):
    from revq_ray.core.model import ReVQModel

    ReVQModel(
        [32, 8, 8], {"quantizer": {"tokens": 512, "codebook_size": 8}, "rectifier": {"width": 32}}
    ).save_pretrained(str(tmp_path / "vit"))
    with pytest.raises(PublishedFormatError, match=r"rectifier.type=vit.*dcae"):
        export_revq(tmp_path / "vit", tmp_path / "exp")


SMALL = (512, 16, 64, 1)


def _import(pub: Path, out: Path) -> Path:
    return import_revq(
        out,
        checkpoint=str(pub / "ckpt.pth"),
        config=str(pub / "512T_NC=16384.yaml"),
        stats=str(pub / "stats.safetensors"),
    )


def _bad(tmp_path: Path, mutate) -> str:
    """Write a small published checkpoint, apply ``mutate(raw, root)``, import; return the error text."""
    raw = write_published(tmp_path / "pub", shape=SMALL)
    mutate(raw, tmp_path / "pub")
    with pytest.raises((PublishedFormatError, FileNotFoundError)) as err:
        _import(tmp_path / "pub", tmp_path / "out")
    assert not (tmp_path / "out" / "model" / "model.safetensors").exists()
    return str(err.value)


def _resave(raw, root, edit):
    edit(raw["ckpt"])
    torch.save(raw["ckpt"], root / "ckpt.pth")


def _truncate(raw, root):
    data = (root / "ckpt.pth").read_bytes()
    (root / "ckpt.pth").write_bytes(data[: len(data) // 2])


def _edit(fn):
    """A mutation that edits the checkpoint dict and saves it again."""
    return lambda raw, root: _resave(raw, root, fn)


def _write(name: str, data):
    return lambda raw, root: (root / name).write_bytes(data) if isinstance(data, bytes) else data(root / name)


WRONG_YAML = yaml.safe_dump(_yaml(512, 16, 64, 1, tokens_per_data=256))
CASES = {
    "truncated": (_truncate, r"ckpt.pth: cannot be read .*truncated"),
    "garbage": (_write("ckpt.pth", b"not a checkpoint" * 10), r"cannot be read"),
    # weights_only: an arbitrary pickled object is refused, never unpickled
    "object": (_edit(lambda c: c.update(epoch=argparse.Namespace(a=1))), r"cannot be read .*Namespace"),
    "no-quantizer": (_edit(lambda c: c.pop("quantizer")), r"key 'quantizer' is missing"),
    "codebook-size": (
        _edit(lambda c: c["quantizer"].update(embeddings=torch.zeros(512, 8, 4))),
        r"embeddings has shape \(512, 8, 4\), expected \(512, 16, 4\)",
    ),
    "decoder-key": (
        _edit(lambda c: c["decoder"].pop("norm_out.bias")),
        r"'decoder': missing 1 key\(s\), e.g. \['norm_out.bias'\]",
    ),
    "decoder-width": (
        _edit(lambda c: c["decoder"].update({"conv_in.weight": torch.zeros(32, 32, 3, 3)})),
        r"conv_in.weight has shape \(32, 32, 3, 3\), expected \(64, 32, 3, 3\).*block_out_channels",
    ),
    "index-offset": (
        _edit(lambda c: c["quantizer"].update(index_offset=torch.zeros(512, dtype=torch.long))),
        r"index_offset",
    ),
    "stats": (
        _write(
            "stats.safetensors",
            lambda p: save_file({"mean": torch.zeros(100), "std": torch.ones(100)}, str(p)),
        ),
        r"mean has shape \(100,\).*2048 values",
    ),
    "yaml": (
        _write("512T_NC=16384.yaml", lambda p: p.write_text(WRONG_YAML)),
        r"model.quantizer.tokens_per_data=256 != num_group=512",
    ),
}


@pytest.mark.parametrize("case", list(CASES))
def test_bad_checkpoints_fail_clearly(tmp_path, case):
    mutate, pattern = CASES[case]
    message = _bad(tmp_path, mutate)
    assert re.search(pattern, message), message


def test_import_cli_reports_errors_without_a_traceback(tmp_path, capsys):
    assert (
        cli(
            ["import-revq", "--checkpoint", str(tmp_path / "nope.pth"), "--config", "x.yaml", "--output", "o"]
        )
        == 2
    )
    assert "no such file" in capsys.readouterr().err
    write_published(tmp_path / "pub", shape=SMALL)
    (tmp_path / "pub" / "stats.safetensors").unlink()
    assert cli(["import-revq", str(tmp_path / "pub"), "--output", str(tmp_path / "o")]) == 2
    assert "--stats" in capsys.readouterr().err


# ------------------------------------------------------------------------------------- dcae + init_from
def _dcae_model(k: int = 8, latent=(32, 4, 4)):
    from revq_ray.core.model import ReVQModel

    cfg = {
        "quantizer": {"tokens": 128, "codebook_size": k},
        "rectifier": {"type": "dcae", "width": 32, "depth": 1, "head_dim": 16},
    }
    return ReVQModel(list(latent), cfg)


@pytest.mark.parametrize("latent", [(32, 4, 4), (32, 16)], ids=["image", "audio"])
def test_dcae_rectifier_trains_like_the_others(latent):
    torch.manual_seed(0)
    model = _dcae_model(latent=latent).train()
    z = torch.randn(16, *latent)
    model.init_codebook(z)
    assert model.param_groups()["rectifier"]  # the trainer gives it its own lr / clip group
    opt = torch.optim.Adam(model.param_groups()["rectifier"], lr=3e-3)
    losses = []
    for _ in range(15):
        out = model(z)
        opt.zero_grad()
        out.losses["rect"].backward()
        opt.step()
        losses.append(out.losses["rect"].item())
    assert losses[-1] < 0.7 * losses[0], losses


@pytest.mark.parametrize("side", [8, 4], ids=["linear-attention", "quadratic-attention"])
def test_dcae_rectifier_equals_diffusers_decoder(side):
    """Pure-PyTorch blocks vs diffusers' own, both attention forms (diffusers switches at H*W <= head_dim)."""
    from revq_ray.core.rectifiers_published import DCAERectifier

    dec = _decoder(64, 2, seed=5)
    rect = DCAERectifier(32, 64, 2, 32)
    rect.load_state_dict(dec.state_dict(), strict=True)  # key for key
    x = torch.randn(3, 32, side, side)
    with torch.no_grad():
        assert (rect(x) - dec(x)).abs().max().item() < 1e-5
        assert (rect(x) - reference_rectifier(x, dec.state_dict(), 64, 2)).abs().max().item() < 1e-5


def test_dcae_config_errors():
    from revq_ray.config import ConfigError, RectifierConfig, parse_config
    from revq_ray.core.rectifiers_published import DCAERectifier

    with pytest.raises(ConfigError, match="expand_ratio"):
        parse_config({"type": "dcae", "expand_ratio": 2.0}, RectifierConfig)
    with pytest.raises(ValueError, match=r"rectifier.width=48 must be a multiple of the latent channels 32"):
        DCAERectifier(32, 48, 1, 16)


def test_init_from_paths_and_shape_errors(tmp_path, monkeypatch):
    from revq_ray.config import ModelConfig
    from revq_ray.published import load_init_weights

    monkeypatch.chdir(tmp_path)
    assert ModelConfig(init_from="./models/x").init_from == str(tmp_path / "models" / "x")
    assert ModelConfig(init_from="AndyRaoTHU/revq-512T").init_from == "AndyRaoTHU/revq-512T"  # a hub id
    (tmp_path / "models" / "x").mkdir(parents=True)  # "owner/name" that exists locally is the directory
    assert ModelConfig(init_from="models/x").init_from == str(tmp_path / "models" / "x")
    _dcae_model(k=8).save_pretrained(str(tmp_path / "saved"))
    target = _dcae_model(k=16)
    with pytest.raises(
        PublishedFormatError, match=r"quantizer.codebook has shape \(128, 8, 4\), expected \(128, 16, 4\)"
    ):
        load_init_weights(target, str(tmp_path / "saved"))
    same = _dcae_model(k=8)
    load_init_weights(same, str(tmp_path / "saved"), log=lambda msg: None)
    saved = type(same).from_pretrained(str(tmp_path / "saved")).state_dict()
    assert all(torch.equal(saved[k], v) for k, v in same.state_dict().items())
