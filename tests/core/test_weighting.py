"""Decoder-weighted standardization and the position token layout (``model.weighting``, ``model.layout``)."""

from __future__ import annotations

import pytest
import torch

from revq_ray.config import ConfigError, ModelConfig
from revq_ray.core.layout import TokenLayout
from revq_ray.core.model import ReVQModel
from revq_ray.core.sensitivity import decoder_channel_weights
from revq_ray.core.standardizer import Standardizer

pytestmark = pytest.mark.core


def _cfg(**kw) -> ModelConfig:
    base = {
        "layout": "position",
        "weighting": "decoder",
        "quantizer": {"tokens": 64, "codebook_size": 16},
        "rectifier": {"type": "cnn", "width": 16, "depth": 1},
    }
    base.update(kw)
    return ModelConfig.model_validate(base)


@pytest.mark.parametrize("shape,tokens", [((8, 4, 4), 32), ((8, 4, 4), 128), ((6, 10), 30)])
def test_position_layout_is_an_exact_inverse_and_groups_channels_by_the_order(shape, tokens):
    layout = TokenLayout(shape, tokens, kind="position")
    z = torch.randn(3, *shape)
    order = torch.randperm(shape[0], generator=torch.Generator().manual_seed(1))
    t_btd = layout.to_tokens(z, order)
    assert t_btd.shape == (3, tokens, layout.dim)
    assert torch.equal(layout.to_latent(t_btd, order), z)
    # token (position s, group g) holds channels order[g::P] at position s
    per_pos, z_bcs = layout.per_position, z.reshape(3, shape[0], -1)
    for s, g in [(0, 0), (layout.positions - 1, per_pos - 1), (layout.positions // 2, per_pos // 2)]:
        assert torch.equal(t_btd[:, s * per_pos + g], z_bcs[:, order[g::per_pos], s])


def test_position_layout_refuses_token_counts_that_do_not_fit_the_positions():
    with pytest.raises(ValueError, match=r"model.layout=position.*valid choices: \[16, 32, 64, 128\]"):
        TokenLayout((8, 4, 4), 8, kind="position")
    with pytest.raises(ValueError, match="model.layout='diagonal'"):
        TokenLayout((8, 4, 4), 8, kind="diagonal")


def test_weighted_standardizer_scales_channels_and_inverts_exactly():
    st = Standardizer((4, 3, 3), weighted=True)
    st.mean.normal_()
    st.std.uniform_(0.5, 2.0)
    w = st.set_channel_weights(torch.tensor([8.0, 4.0, 0.0, 4.0]))
    assert float(w.mean()) == pytest.approx(1.0)
    assert float(w[2]) > 0  # floored: an ignored channel still round-trips
    z = torch.randn(5, 4, 3, 3, dtype=torch.float64).float()
    torch.testing.assert_close(st.inverse(st(z)), z)
    plain = (z - st.mean) / st.std
    # squared distances weigh channel c by w_c
    torch.testing.assert_close(st(z).pow(2), plain.pow(2) * w.view(4, 1, 1))
    with pytest.raises(RuntimeError, match="weighting: none"):
        Standardizer((4, 3, 3)).set_channel_weights(torch.ones(4))
    with pytest.raises(ValueError, match="4 finite values"):
        st.set_channel_weights(torch.tensor([1.0, float("nan"), 1.0, 1.0]))


def test_sensitivity_of_a_known_decoder_is_its_jacobian_diagonal():
    """decode(z) = z * s_c (per channel): in standardized units the Jacobian's diagonal is (s_c std_c)^2, and
    the sign-probe estimator is exact for a diagonal Jacobian."""
    s_c = torch.tensor([3.0, 1.0, 0.0, 0.5]).view(1, 4, 1, 1)
    std = torch.rand(4, 2, 2) + 0.5
    mean = torch.randn(4, 2, 2)
    w = decoder_channel_weights(
        lambda z: z * s_c, torch.randn(10, 4, 2, 2), mean, std, probes=2, batch_size=3
    )
    expected = (s_c.view(4, 1, 1) * std).pow(2).mean((1, 2)).double()
    torch.testing.assert_close(w, expected / expected.mean())
    assert float(w[2]) == 0.0
    with pytest.raises(ValueError, match="zero gradient"):
        decoder_channel_weights(lambda z: z * 0.0, torch.randn(2, 4, 2, 2), mean, std)


def test_weighted_position_model_round_trips_ids_and_saves_its_order(tmp_path):
    model = ReVQModel.from_config([8, 4, 4], _cfg())
    w = torch.tensor([0.1, 5.0, 0.2, 3.0, 0.3, 0.4, 2.0, 0.05])
    model.set_channel_weights(w)
    assert model.channel_order.tolist() == torch.argsort(w, descending=True).tolist()
    model.init_codebook(torch.randn(64, 8, 4, 4))
    model.eval()
    x = torch.randn(6, 8, 4, 4)
    ids = model.encode(x)
    with torch.no_grad():
        assert torch.equal(model(x).latents_rec, model.decode(ids))
    model.save_pretrained(tmp_path)
    again = ReVQModel.from_pretrained(str(tmp_path))
    assert torch.equal(again.channel_order, model.channel_order)
    assert torch.equal(again.standardizer.channel_weight, model.standardizer.channel_weight)
    with torch.no_grad():
        assert torch.equal(again.decode(ids), model.decode(ids))
    # an unweighted contiguous model has neither buffer: old checkpoints load as they always did
    plain = ReVQModel.from_config([8, 4, 4], _cfg(layout="contiguous", weighting="none"))
    assert not hasattr(plain, "channel_order") and not hasattr(plain.standardizer, "channel_weight")


def test_decoder_weighting_is_refused_for_gq_and_needs_a_vae(tmp_path):
    with pytest.raises(ValueError, match="weighting=decoder does not apply to model.quantizer.type=gq"):
        _cfg(quantizer={"type": "gq", "tokens": 64, "codebook_size": 16})
    from revq_ray.config import RunConfig
    from revq_ray.data.shards import read_manifest
    from revq_ray.data.synthetic import write_synthetic_shards
    from revq_ray.train.plan import _check_config

    write_synthetic_shards(tmp_path / "s", 16, (8, 4, 4), shard_size=16, seed=0)
    manifest = read_manifest(str(tmp_path / "s"))
    assert manifest.vae == "synthetic"  # not a VAE spec

    def run_cfg(tokens: int, vae: str = "") -> RunConfig:
        return RunConfig.model_validate(
            {"vae": vae, "data": {"shards": str(tmp_path / "s")}, "model": _cfg(quantizer={"tokens": tokens})}
        )

    with pytest.raises(ConfigError, match="set vae: <spec>"):
        _check_config(run_cfg(64), manifest)
    with pytest.raises(ConfigError, match="model.layout=position"):
        _check_config(run_cfg(8, vae="taesd:/nowhere"), manifest)
