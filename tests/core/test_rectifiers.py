"""Rectifiers: shapes (images and audio), identity at init, training, parameter counts, fidelity to DC-AE."""

from __future__ import annotations

import pytest
import torch

from revq_ray.config import ConfigError, RectifierConfig, parse_config
from revq_ray.core.rectifiers import EfficientViTBlock, build_rectifier, vit_param_count

pytestmark = pytest.mark.core

TYPES = ["vit", "cnn", "mlp", "identity"]


def _cfg(kind: str, width: int = 64, depth: int = 2) -> RectifierConfig:
    return RectifierConfig(type=kind, width=width, depth=depth, head_dim=16, expand_ratio=2.0)


@pytest.mark.parametrize("kind", TYPES)
@pytest.mark.parametrize(
    "shape, spatial_dims",
    [((3, 32, 8, 8), 2), ((3, 8, 24), 1), ((3, 8, 24), 2)],
    ids=["image", "audio-1d", "audio-as-2d"],
)
def test_shape_preserved_and_identity_at_init(kind, shape, spatial_dims):
    torch.manual_seed(0)
    rect = build_rectifier(_cfg(kind), channels=shape[1], spatial_dims=spatial_dims)
    x = torch.randn(shape)
    y = rect(x)
    assert y.shape == x.shape
    # The last conv is zero-initialized around a residual: an untrained rectifier is exactly the identity.
    assert torch.equal(y, x)


@pytest.mark.parametrize("kind", ["vit", "cnn", "mlp"])
@pytest.mark.parametrize(
    "shape, spatial_dims", [((16, 8, 4, 4), 2), ((16, 8, 12), 1)], ids=["image", "audio"]
)
def test_trains_on_toy_task(kind, shape, spatial_dims):
    """Learn a fixed per-element affine-plus-nonlinear correction; loss must drop well within 40 steps."""
    torch.manual_seed(0)
    rect = build_rectifier(_cfg(kind, width=32, depth=1), channels=shape[1], spatial_dims=spatial_dims)
    opt = torch.optim.Adam(rect.parameters(), lr=3e-3)
    gen = torch.Generator().manual_seed(1)
    losses = []
    for _ in range(40):
        x = torch.randn(shape, generator=gen)
        target = 0.6 * x + 0.3 * torch.tanh(2 * x) + 0.2
        loss = torch.nn.functional.mse_loss(rect(x), target)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0], losses
    assert all(torch.isfinite(torch.tensor(losses)))


def test_vit_param_count_formula_and_512t_size():
    for channels, width, depth, head_dim, expand, sd in [
        (32, 64, 2, 16, 4.0, 2),
        (8, 96, 1, 32, 2.0, 1),
        (4, 32, 0, 32, 4.0, 2),
    ]:
        cfg = RectifierConfig(type="vit", width=width, depth=depth, head_dim=head_dim, expand_ratio=expand)
        rect = build_rectifier(cfg, channels, sd)
        n = sum(p.numel() for p in rect.parameters())
        assert n == vit_param_count(channels, width, depth, head_dim, expand, sd)
    # ReVQ 512T: C=32 at 8x8, W=512, L=3; the paper says about 14 M parameters.
    n512 = vit_param_count(32, 512, 3)
    assert 13.5e6 < n512 < 14.5e6, n512
    assert n512 == sum(p.numel() for p in build_rectifier(RectifierConfig(), 32).parameters())


def test_vit_block_matches_diffusers_efficientvit_block():
    """Our pure-torch block computes what DC-AE's EfficientViTBlock (the reference's rectifier) computes."""
    dmod = pytest.importorskip("diffusers.models.autoencoders.autoencoder_dc")
    torch.manual_seed(0)
    width, head_dim = 64, 16
    ref = dmod.EfficientViTBlock(
        width, attention_head_dim=head_dim, qkv_multiscales=(5,), norm_type="rms_norm"
    )
    for p in ref.parameters():  # non-trivial norms and biases too
        torch.nn.init.normal_(p, std=0.2)
    ours = EfficientViTBlock(width, head_dim=head_dim, expand_ratio=4.0)
    a, f = ref.attn, ref.conv_out
    ms = a.to_qkv_multiscale[0]
    sd = {
        "attn.qkv.weight": torch.cat([a.to_q.weight, a.to_k.weight, a.to_v.weight])[..., None, None],
        "attn.aggreg.0.0.weight": ms.proj_in.weight,
        "attn.aggreg.0.1.weight": ms.proj_out.weight,
        "attn.proj.weight": a.to_out.weight[..., None, None],
        "attn.norm.weight": a.norm_out.weight,
        "attn.norm.bias": a.norm_out.bias,
        "ffn.inverted.weight": f.conv_inverted.weight,
        "ffn.inverted.bias": f.conv_inverted.bias,
        "ffn.depth.weight": f.conv_depth.weight,
        "ffn.depth.bias": f.conv_depth.bias,
        "ffn.point.weight": f.conv_point.weight,
        "ffn.norm.weight": f.norm.weight,
        "ffn.norm.bias": f.norm.bias,
    }
    ours.load_state_dict(sd, strict=True)
    for hw in [(8, 8), (4, 4)]:  # 8x8 takes diffusers' linear path, 4x4 its quadratic one: same maths
        x = torch.randn(2, width, *hw)
        with torch.no_grad():
            torch.testing.assert_close(ours(x), ref(x), rtol=1e-4, atol=1e-4)


def test_bf16_forward_is_finite():
    rect = build_rectifier(_cfg("vit"), 32).to(torch.bfloat16)
    torch.nn.init.normal_(rect.head.weight, std=0.01)
    y = rect(torch.randn(2, 32, 8, 8, dtype=torch.bfloat16))
    assert y.dtype == torch.bfloat16 and torch.isfinite(y.float()).all()


def test_bad_inputs_raise_clear_errors():
    rect = build_rectifier(_cfg("cnn"), 32)
    with pytest.raises(ValueError, match="rectifier expects"):
        rect(torch.randn(2, 16, 8, 8))
    rect1d = build_rectifier(_cfg("cnn"), 8, spatial_dims=1)
    with pytest.raises(ValueError, match="spatial_dims"):
        rect1d(torch.randn(2, 8, 4, 4))
    with pytest.raises(ValueError, match="spatial_dims"):
        build_rectifier(_cfg("cnn"), 8, spatial_dims=3)
    with pytest.raises(ConfigError, match="head_dim"):
        parse_config({"type": "vit", "width": 100, "head_dim": 32}, RectifierConfig)
    with pytest.raises(ConfigError, match="rectifier|type"):
        parse_config({"type": "transformer"}, RectifierConfig)
