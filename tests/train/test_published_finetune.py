"""Fine-tuning a published (imported) ReVQ model with ``model.init_from``, through ``revq_ray.train``.

A checkpoint in the authors' layout (diffusers' DC-AE Decoder as the rectifier, random codebook, identity
statistics) is written, imported with ``revq-ray import-revq``, and the debug preset trains a few steps from
it on real (32, 8, 8) latents: the run starts from the imported tensors (no sampled codebook init), and a
model section that does not match the import is refused before any worker starts.
"""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file, save_file

from revq_ray.config import ConfigError

from .conftest import make_cfg, read_metrics

pytestmark = [pytest.mark.train]

G, K, WIDTH, DEPTH, HEAD = 512, 32, 32, 1, 16  # make_cfg's debug sizes: 512 tokens of d=4, K=32, 32 x 1


def _write_published(root: Path) -> dict[str, torch.Tensor]:
    from diffusers.models.autoencoders.autoencoder_dc import Decoder

    torch.manual_seed(0)
    dec = Decoder(
        in_channels=32, latent_channels=32, attention_head_dim=HEAD, block_type="EfficientViTBlock",
        block_out_channels=(WIDTH,), layers_per_block=(DEPTH,), qkv_multiscales=((5,),), norm_type="rms_norm",
        act_fn="silu", upsample_block_type="interpolate",
    )  # fmt: skip
    emb = torch.randn(G, K, 2048 // G)
    ckpt = {"decoder": dec.state_dict(), "quantizer": {"embeddings": emb, "count": torch.ones(G, K)}}
    root.mkdir(parents=True)
    torch.save(ckpt, root / "ckpt.pth")
    cfg = {
        "model": {
            "input_data_size": [32, 8, 8],
            "quantizer": {"TYPE": "vq", "num_code": K, "num_group": G, "tokens_per_data": G},
            "decoder": {"TYPE": "dc_ae", "in_channels": 32, "latent_channels": 32, "attention_head_dim": HEAD,
                        "block_type": ["EfficientViTBlock"], "block_out_channels": [WIDTH],
                        "layers_per_block": [DEPTH], "qkv_multiscales": [[5]], "norm_type": "rms_norm"},
        }
    }  # fmt: skip
    (root / "512T_NC=16384.yaml").write_text(yaml.safe_dump(cfg))
    save_file({"mean": torch.zeros(2048), "std": torch.ones(2048)}, str(root / "stats.safetensors"))
    return {"codebook": emb, "conv_in": dec.state_dict()["conv_in.weight"]}


@pytest.fixture(scope="module")
def imported(tmp_path_factory) -> tuple[Path, dict[str, torch.Tensor]]:
    from revq_ray.cli import main as cli

    root = tmp_path_factory.mktemp("published")
    raw = _write_published(root / "pub")
    assert cli(["import-revq", str(root / "pub"), "--output", str(root / "bundle")]) == 0
    return root / "bundle", raw


@pytest.mark.slow  # Ray Train + DeepSpeed start-up: 72 s and 133 s measured on two shared cores
def test_finetune_starts_from_the_imported_model(ray_local, latent_shards, tmp_path, imported):
    from revq_ray.train import run

    bundle, raw = imported
    cfg = make_cfg(
        latent_shards, tmp_path, "ft",
        **{"model.init_from": str(bundle), "model.rectifier.type": "dcae", "train.max_steps": 3,
           "train.lr": 1e-3, "model.quantizer.reset.enabled": False},
    )  # fmt: skip
    result = run(cfg)
    assert result.error is None, result.error
    rows = read_metrics(tmp_path / "ft")
    assert [int(r["step"]) for r in rows] == [1, 2, 3]
    assert all(math.isfinite(float(r["loss"])) for r in rows)
    final = load_file(str(tmp_path / "ft" / "export" / "latest" / "model.safetensors"))
    # The standardizer is the import's (identity), not the data's statistics.
    assert torch.equal(final["standardizer.mean"], torch.zeros(32, 8, 8))
    assert torch.equal(final["standardizer.std"], torch.ones(32, 8, 8))
    # Codebook and rectifier moved a little from the imported values (3 AdamW steps at lr 1e-3; no reset) ...
    moved = (final["quantizer.codebook"] - raw["codebook"]).abs()
    assert 0 < moved.max().item() < 0.01
    rect_moved = (final["rectifier.conv_in.weight"] - raw["conv_in"]).abs().max().item()
    assert 0 < rect_moved < 0.01 * 0.05 * 3 * 1.01  # the rectifier's lr is lr * rectifier_lr_scale
    # ... whereas a sampled init would have put data tokens there (unit scale), far from these codes.


def test_mismatched_model_section_is_refused_before_training(tmp_path, latent_shards, imported):
    from revq_ray.train import build_trainer

    bundle, _ = imported
    cfg = make_cfg(latent_shards, tmp_path, "bad", **{"model.init_from": str(bundle)})
    with pytest.raises(ConfigError, match=r"--set model.rectifier.type=dcae"):
        build_trainer(cfg)
    cfg = make_cfg(
        latent_shards, tmp_path, "bad2",
        **{"model.init_from": str(tmp_path / "missing"), "model.rectifier.type": "dcae"},
    )  # fmt: skip
    with pytest.raises(ConfigError, match=r"model.init_from=.*missing.*holds no trained model"):
        build_trainer(cfg)
