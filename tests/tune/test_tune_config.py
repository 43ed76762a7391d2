"""Tuning presets load and validate; bad search spaces fail early with a message naming the key."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from revq_ray.config import ConfigError, RunConfig, parse_config
from revq_ray.tune import (
    TuneConfig,
    codebook_size_for,
    dump_tune_config,
    load_tune_config,
    pareto_front,
    trial_config_data,
)

pytestmark = pytest.mark.tune

ROOT = Path(__file__).resolve().parents[2]
PRESETS = sorted((ROOT / "tuning").glob("*.yaml"))


def test_there_are_presets():
    names = {p.stem for p in PRESETS}
    assert {"debug", "imagenet_512T", "fashion_mnist"} <= names


@pytest.mark.parametrize("path", PRESETS, ids=lambda p: p.stem)
def test_every_preset_loads_and_validates(path, monkeypatch):
    monkeypatch.chdir(ROOT)
    tcfg = load_tune_config(path)
    assert Path(tcfg.base).is_file()
    assert tcfg.space
    # Round trip: what a sweep saves next to its results loads again.
    again = parse_config(yaml.safe_load(dump_tune_config(tcfg)), TuneConfig)
    assert again == tcfg


def _write(tmp_path: Path, space: dict, **extra) -> Path:
    base = tmp_path / "base.yaml"
    base.write_text(
        yaml.safe_dump(
            {"name": "b", "model": {"quantizer": {"tokens": 64, "codebook_size": 16}}, "train": {"epochs": 3}}
        )
    )
    preset = {"base": str(base), "latent_shape": [32, 8, 8], "space": space, **extra}
    path = tmp_path / "sweep.yaml"
    path.write_text(yaml.safe_dump(preset))
    return path


def test_tokens_must_divide_the_latent_size(tmp_path):
    path = _write(tmp_path, {"model.quantizer.tokens": {"choice": [64, 100, 256]}})
    with pytest.raises(ConfigError, match=r"model\.quantizer\.tokens.*\[100\].*2048") as err:
        load_tune_config(path)
    assert "valid token counts" in str(err.value)


def test_tokens_must_be_a_choice(tmp_path):
    path = _write(tmp_path, {"model.quantizer.tokens": {"int": [32, 512]}})
    with pytest.raises(ConfigError, match=r"model\.quantizer\.tokens.*choice"):
        load_tune_config(path)


def test_base_tokens_checked_too(tmp_path):
    path = _write(tmp_path, {"train.lr": {"loguniform": [1e-4, 1e-2]}}, latent_shape=[3, 5, 7])
    with pytest.raises(ConfigError, match=r"\[64\] do not divide the latent size 105"):
        load_tune_config(path)


@pytest.mark.parametrize(
    "key, needle",
    [
        ("train.learning_rate", "train has no field 'learning_rate'"),
        ("model.quantiser.tokens", "model has no field 'quantiser'"),
        ("model.quantizer.reset", "is a section"),
        ("train.lr.value", "is a value, not a section"),
    ],
)
def test_unknown_dotted_key_rejected(tmp_path, key, needle):
    path = _write(tmp_path, {key: {"choice": [1, 2]}})
    with pytest.raises(ConfigError) as err:
        load_tune_config(path)
    assert key in str(err.value) and needle in str(err.value)


def test_invalid_value_names_key_and_value(tmp_path):
    path = _write(tmp_path, {"model.quantizer.reset.ratio": {"uniform": [0.1, 1.5]}})
    with pytest.raises(ConfigError, match=r"model\.quantizer\.reset\.ratio.*1\.5"):
        load_tune_config(path)


def test_distribution_needs_exactly_one_kind(tmp_path):
    path = _write(tmp_path, {"train.lr": {"uniform": [0.1, 0.2], "loguniform": [0.1, 0.2]}})
    with pytest.raises(ConfigError, match=r"space\.train\.lr.*exactly one"):
        load_tune_config(path)
    path = _write(tmp_path, {"train.lr": {"loguniform": [0.0, 0.2]}})
    with pytest.raises(ConfigError, match="low=0.0 must be > 0"):
        load_tune_config(path)
    path = _write(tmp_path, {"train.lr": {"uniform": [0.1, 0.2], "typo": 1}})
    with pytest.raises(ConfigError, match=r"typo: unknown key"):
        load_tune_config(path)


def test_bits_budget_fixes_codebook_size(tmp_path):
    assert codebook_size_for(1024, 256) == 16
    assert codebook_size_for(1024, 128) == 256
    assert codebook_size_for(1000, 256) == 16  # 3.9 bits per token -> 2**4
    path = _write(tmp_path, {"model.quantizer.tokens": {"choice": [128, 256]}}, bits_budget=1024)
    tcfg = load_tune_config(path)
    base = yaml.safe_load(Path(tcfg.base).read_text())
    data = trial_config_data(tcfg, base, {"model.quantizer.tokens": 128}, name="t1", output_dir="/tmp/x")
    cfg = parse_config(data, RunConfig)
    assert cfg.model.quantizer.codebook_size == 256 and cfg.model.quantizer.bits_per_sample == 1024
    # Searching the codebook size as well contradicts the budget.
    path = _write(
        tmp_path,
        {"model.quantizer.tokens": {"choice": [128]}, "model.quantizer.codebook_size": {"choice": [4]}},
        bits_budget=1024,
    )
    with pytest.raises(ConfigError, match="bits_budget"):
        load_tune_config(path)
    # A budget that gives less than one bit per token for some choice.
    path = _write(tmp_path, {"model.quantizer.tokens": {"choice": [512, 2048]}}, bits_budget=512)
    with pytest.raises(ConfigError, match="tokens=2048"):
        load_tune_config(path)


def test_trial_config_sets_resources_length_and_name(tmp_path):
    path = _write(
        tmp_path,
        {"train.lr": {"loguniform": [1e-4, 1e-2]}},
        resources_per_trial={"workers": 2, "cpus_per_worker": 0.5},
        asha={"max_t": 7, "grace_period": 2},
    )
    tcfg = load_tune_config(path)
    base = yaml.safe_load(Path(tcfg.base).read_text())
    cfg = parse_config(
        trial_config_data(tcfg, base, {"train.lr": 3e-3}, name="trial_x", output_dir="/o"), RunConfig
    )
    assert (cfg.train.num_workers, cfg.train.cpus_per_worker, cfg.train.epochs) == (2, 0.5, 7)
    assert (cfg.train.lr, cfg.name, cfg.output_dir) == (3e-3, "trial_x", "/o")


def test_reserved_and_length_keys_rejected(tmp_path):
    path = _write(tmp_path, {"train.num_workers": {"choice": [1, 2]}})
    with pytest.raises(ConfigError, match="train.num_workers.*set by the sweep"):
        load_tune_config(path)
    path = _write(tmp_path, {"train.epochs": {"choice": [1, 2]}})
    with pytest.raises(ConfigError, match="asha.max_t"):
        load_tune_config(path)


def test_two_objectives(tmp_path):
    path = _write(
        tmp_path,
        {"model.quantizer.tokens": {"choice": [64, 128]}},
        metric=["val_mse", "bits_per_sample"],
        mode=["min", "min"],
    )
    tcfg = load_tune_config(path)
    assert tcfg.metrics == ["val_mse", "bits_per_sample"] and tcfg.primary_metric == "val_mse"
    path = _write(
        tmp_path, {"train.lr": {"choice": [1e-3]}}, metric=["val_mse", "bits_per_sample"], mode="min"
    )
    with pytest.raises(ConfigError, match="one metric and one mode, or two of each"):
        load_tune_config(path)
    # (mse, bits): (1, 10) and (2, 5) are both optimal; (3, 10) is dominated by both.
    assert pareto_front([(1.0, 10.0), (2.0, 5.0), (3.0, 10.0)], ["min", "min"]) == [0, 1]


def test_latent_size_from_manifest(tmp_path):
    from revq_ray.data.synthetic import write_synthetic_shards

    write_synthetic_shards(tmp_path / "shards", 8, (4, 2, 2))
    base = tmp_path / "base.yaml"
    base.write_text(yaml.safe_dump({"data": {"shards": str(tmp_path / "shards")}}))
    sweep = tmp_path / "sweep.yaml"
    sweep.write_text(
        yaml.safe_dump({"base": str(base), "space": {"model.quantizer.tokens": {"choice": [4, 3]}}})
    )
    with pytest.raises(ConfigError, match=r"\[3\] do not divide the latent size 16"):
        load_tune_config(sweep)
    # No manifest and no latent_shape: the divisor check cannot run; a sweep refuses to start.
    base.write_text(yaml.safe_dump({"data": {"shards": str(tmp_path / "missing")}}))
    with pytest.raises(ConfigError, match="latent_shape"):
        load_tune_config(sweep, check_data=True)


def test_sweep_plot_goes_logarithmic_only_when_trials_spread_widely():
    from revq_ray.tune.plots import metric_scale

    assert metric_scale([0.0037, 0.0041, 0.34]) == "log"  # the 5,120-bit study: 90x apart
    assert metric_scale([0.0163, 0.0179, 0.0488]) == "linear"  # 3x: a linear axis reads better
    assert metric_scale([0.0, 0.5, 1.0]) == "linear"  # a zero has no place on a log axis
    assert metric_scale([-1.0, 30.0]) == "linear"  # nor a negative metric (mode: max sweeps)
    assert metric_scale([0.01, float("nan"), 1.0]) == "log"  # a diverged trial does not decide it
    assert metric_scale([]) == "linear"
