"""Config validation (bad values name their dotted field), overrides, token layout, stats, standardizer."""

from __future__ import annotations

import copy

import pytest
import torch

from revq_ray.config import (
    ConfigError,
    QuantizerConfig,
    ResetConfig,
    RunConfig,
    apply_overrides,
    dump_config,
    parse_config,
)
from revq_ray.core.layout import TokenLayout, valid_token_counts
from revq_ray.core.standardizer import Standardizer
from revq_ray.core.stats import RunningStats

pytestmark = pytest.mark.core


def nested(path: str, value) -> dict:
    """``"a.b.c", v`` -> ``{"a": {"b": {"c": v}}}``."""
    out: dict = {}
    node = out
    parts = path.split(".")
    for p in parts[:-1]:
        node = node.setdefault(p, {})
    node[parts[-1]] = value
    return out


INVALID = [
    # model.quantizer
    ("model.quantizer.type", "fsq"),
    ("model.quantizer.tokens", 0),
    ("model.quantizer.tokens", "many"),
    ("model.quantizer.codebook_size", 1),
    ("model.quantizer.codebook_size", 2.5),
    ("model.quantizer.loss", "both"),
    ("model.quantizer.beta", -0.1),
    ("model.quantizer.init", "kmeans"),
    ("model.quantizer.kmeans_iters", -1),
    ("model.quantizer.search_budget_mb", -5.0),
    ("model.quantizer.simvq_shared", [1]),
    ("model.quantizer.simvq_seed", -1),
    ("model.quantizer.gq_beta", -1.0),
    ("model.quantizer.gq_seed", -1),
    ("model.quantizer.codebook", 3),  # unknown key
    # model.quantizer.reset
    ("model.quantizer.reset.enabled", "sometimes"),
    ("model.quantizer.reset.dead_threshold", 0),
    ("model.quantizer.reset.ratio", 0.0),
    ("model.quantizer.reset.ratio", 1.5),
    ("model.quantizer.reset.noise", -0.1),
    ("model.quantizer.reset.interval", 0),
    ("model.quantizer.reset.unit", "days"),
    ("model.quantizer.reset.every", 2),  # unknown key
    # model.rectifier
    ("model.rectifier.type", "rnn"),
    ("model.rectifier.width", 0),
    ("model.rectifier.depth", -1),
    ("model.rectifier.head_dim", 0),
    ("model.rectifier.expand_ratio", 0.0),
    ("model.rectifier.layers", 3),  # unknown key
    # model
    ("model.encoder", {}),  # unknown key
    # data
    ("data.val_items", -1),
    ("data.shuffle_buffer", -1),
    ("data.init_samples", -2),
    ("data.prefetch_batches", -1),
    ("data.path", "x"),  # unknown key
    # train
    ("train.num_workers", 0),
    ("train.use_gpu", "maybe"),
    ("train.cpus_per_worker", 0),
    ("train.torch_threads", 0),
    ("train.zero_stage", 4),
    ("train.zero_stage", -1),
    ("train.precision", "fp16"),
    ("train.batch_size", 0),
    ("train.epochs", 0),
    ("train.max_steps", -1),
    ("train.steps_per_epoch", -1),
    ("train.lr", 0.0),
    ("train.rectifier_lr_scale", 0.0),
    ("train.rectifier_weight_decay", -1e-4),
    ("train.final_lr_fraction", 0.0),
    ("train.final_lr_fraction", 1.5),
    ("train.grad_clip", -1.0),
    ("train.log_every", 0),
    ("train.val_every", -1),
    ("train.checkpoint_every", -1),
    ("train.keep_checkpoints", 0),
    ("train.max_failures", -1),
    ("train.fail_at_step", "soon"),
    ("train.resources_per_worker", "gpu"),
    ("train.resources_per_worker", {"custom": "lots"}),
    ("train.export_all_ranks", "maybe"),
    ("train.synthetic_items", -1),
    ("train.synthetic_latent_shape", "16x8x8"),
    ("train.learning_rate", 1e-3),  # unknown key
    # run (top level)
    ("name", ""),
    ("name", "a/b"),
    ("name", ".."),
    ("seed", -1),
    ("epochs", 3),  # unknown key
]


@pytest.mark.parametrize("path,value", INVALID, ids=[f"{p}={v!r}" for p, v in INVALID])
def test_invalid_values_name_their_field(path, value):
    with pytest.raises(ConfigError) as err:
        parse_config(nested(path, value))
    msg = str(err.value)
    assert path in msg, msg


def test_unknown_key_message_says_unknown():
    with pytest.raises(ConfigError, match=r"model\.quantizer\.reset\.every: unknown key"):
        parse_config(nested("model.quantizer.reset.every", 1))


def test_vit_width_must_be_multiple_of_head_dim():
    with pytest.raises(ConfigError) as err:
        parse_config({"model": {"rectifier": {"type": "vit", "width": 100, "head_dim": 32}}})
    assert "model.rectifier" in str(err.value) and "head_dim" in str(err.value)
    parse_config({"model": {"rectifier": {"type": "cnn", "width": 100, "head_dim": 32}}})


def test_every_error_is_reported_at_once():
    with pytest.raises(ConfigError) as err:
        parse_config({"train": {"epochs": 0, "lr": -1}, "model": {"quantizer": {"tokens": 0}}})
    msg = str(err.value)
    assert "train.epochs" in msg and "train.lr" in msg and "model.quantizer.tokens" in msg


def test_valid_config_and_section_classes():
    cfg = parse_config({"model": {"quantizer": {"type": "simvq", "codebook_size": 1024}}})
    assert isinstance(cfg, RunConfig) and cfg.model.quantizer.codebook_size == 1024
    q = parse_config({"tokens": 8, "reset": {"ratio": 0.5}}, QuantizerConfig)
    assert q.bits_per_sample == 8 * 14 and q.reset.ratio == 0.5
    with pytest.raises(ConfigError, match="ratio"):
        parse_config({"ratio": 2.0}, ResetConfig)
    # plain VQ is the no-reset ablation
    assert parse_config({"type": "vq"}, QuantizerConfig).reset.enabled is False


def test_apply_overrides():
    base = {"train": {"epochs": 5}, "model": {"quantizer": {"tokens": 16}}}
    snapshot = copy.deepcopy(base)
    out = apply_overrides(
        base,
        [
            "train.epochs=2",
            "train.lr=3e-4",
            "model.quantizer.reset.ratio=0.5",  # creates the nested section
            "train.use_gpu=true",
            "name=my-run",
            "model.quantizer.type=gq",
        ],
    )
    assert base == snapshot  # the input is not modified
    cfg = parse_config(out)
    assert cfg.train.epochs == 2 and cfg.train.lr == pytest.approx(3e-4) and cfg.train.use_gpu is True
    assert cfg.model.quantizer.reset.ratio == 0.5 and cfg.model.quantizer.tokens == 16
    assert cfg.name == "my-run" and cfg.model.quantizer.type == "gq"
    with pytest.raises(ConfigError, match="expected dotted.key=value"):
        apply_overrides(base, ["train.epochs"])
    with pytest.raises(ConfigError, match="not a section"):
        apply_overrides(base, ["train.epochs.x=1"])
    with pytest.raises(ConfigError, match="train.epochs"):
        parse_config(apply_overrides(base, ["train.epochs=zero"]))


def test_dump_round_trip():
    import yaml

    cfg = parse_config({"name": "x", "model": {"quantizer": {"tokens": 4, "reset": {"interval": 3}}}})
    again = parse_config(yaml.safe_load(dump_config(cfg)))
    assert again == cfg


# ------------------------------------------------------------------------------------------ layout
def test_token_layout_bad_t_lists_valid_choices():
    with pytest.raises(ValueError) as err:
        TokenLayout((4, 2, 2), 3)
    msg = str(err.value)
    assert "model.quantizer.tokens=3" in msg and str(valid_token_counts(16)) in msg
    assert valid_token_counts(16) == [1, 2, 4, 8, 16]
    with pytest.raises(ValueError, match="expected"):
        TokenLayout((4,), 2)


def test_token_layout_round_trip_is_c_major():
    lay = TokenLayout((32, 8, 8), 512)
    assert lay.dim == 4
    z = torch.randn(3, 32, 8, 8)
    t = lay.to_tokens(z)
    assert t.shape == (3, 512, 4)
    assert torch.equal(t[1, 2], z[1, 0, 1, 0:4])  # token 2 = first half of row 1 of channel 0
    assert torch.equal(lay.to_latent(t), z)
    with pytest.raises(ValueError):
        lay.to_tokens(torch.randn(3, 32, 8, 4))


# ------------------------------------------------------------------------------------------ stats
def test_running_stats_merge_equals_direct():
    g = torch.Generator().manual_seed(0)
    data = torch.randn(1000, 3, 4, generator=g, dtype=torch.float64) * 5 + 2
    parts = [data[:1], data[1:137], data[137:500], data[500:500], data[500:]]
    partials = [RunningStats((3, 4)).update(p) for p in parts]
    merged = RunningStats((3, 4))
    for p in partials:
        merged.merge(p)
    assert merged.count == 1000
    torch.testing.assert_close(merged.mean, data.mean(0), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(merged.var, data.var(0, unbiased=False), rtol=1e-10, atol=1e-12)
    again = RunningStats.from_state_dict(merged.state_dict())
    assert (
        again.count == merged.count
        and torch.equal(again.mean, merged.mean)
        and torch.equal(again.m2, merged.m2)
    )
    with pytest.raises(ValueError):
        merged.merge(RunningStats((4, 3)))


def test_standardizer_round_trip():
    g = torch.Generator().manual_seed(1)
    z = torch.randn(64, 4, 2, 2, generator=g) * torch.tensor([1.0, 3.0, 0.5, 10.0])[:, None, None] + 7
    s = Standardizer((4, 2, 2))
    s.fit([z[:10], z[10:]])
    zs = s(z)
    torch.testing.assert_close(zs.mean(0), torch.zeros(4, 2, 2), atol=1e-5, rtol=0)
    torch.testing.assert_close(zs.std(0, unbiased=False), torch.ones(4, 2, 2), atol=1e-4, rtol=0)
    torch.testing.assert_close(s.inverse(zs), z, atol=1e-5, rtol=1e-6)
    s2 = Standardizer((4, 2, 2))
    s2.load_state_dict(s.state_dict())
    assert torch.equal(s2(z), zs)
    with pytest.raises(ValueError, match="at least 2"):
        Standardizer((4, 2, 2)).fit([z[:1]])
