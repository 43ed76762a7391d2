"""Hyperparameter search over revq-ray training: one Ray Train run per trial, Optuna (seeded) + ASHA.

    python -m revq_ray.tune --config tuning/debug.yaml [--set num_samples=8] [--train-set train.lr=3e-3]

A tuning preset (``tuning/*.yaml``, :class:`TuneConfig`) names a training preset (``base``, a
``configs/*.yaml`` file, plus ``overrides``) and a search ``space`` of dotted
:class:`~revq_ray.config.RunConfig` keys. Each trial is a Ray Tune function that builds the trial's full
RunConfig (base + overrides + sampled values + per-trial resources) and runs it with the same
``revq_ray.train.build_trainer`` that ``python -m revq_ray.train`` uses, with Train V2's Tune report
callback so worker reports reach Tune (and ASHA can stop a trial between reports).

Special handling:

- ``model.quantizer.tokens`` must divide the latent size (C*H*W of the manifest's ``latent_shape``, or the
  preset's ``latent_shape``): every choice is checked before anything runs.
- ``bits_budget`` (bits per sample) fixes the rate: ``codebook_size = 2**round(bits_budget / tokens)``, so
  a sweep over tokens compares groupings at (about) equal bits.
- Two objectives (``metric: [val_mse, bits_per_sample]``): Optuna's multi-objective TPE, a Pareto plot
  and a ``pareto_optimal`` column (``best.yaml`` is the best trial on the first objective).

Outputs in the sweep directory ``<output_dir>/<name>/``: Tune's experiment state (an interrupted sweep
resumes when the same command runs again; finished trials are kept, not re-run), one Train run per trial
under ``runs/``, ``results.csv`` (one row per trial), ``best.yaml`` (the best trial as a complete training
preset: ``python -m revq_ray.train --config best.yaml``), ``sweep.png`` (and ``pareto.png``).
"""

from __future__ import annotations

import argparse
import builtins
import copy
import csv
import io
import json
import math
import os
import sys
import time
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, Field, field_validator, model_validator

from revq_ray.config import (
    ConfigError,
    RunConfig,
    _Section,
    apply_overrides,
    dump_config,
    load_yaml,
    parse_config,
)

TOKENS_KEY = "model.quantizer.tokens"
CODEBOOK_KEY = "model.quantizer.codebook_size"
BITS_METRIC = "bits_per_sample"
# Keys a sweep sets itself: sampling them would be silently overwritten.
_RESERVED_KEYS = {"name", "output_dir", "train.num_workers", "train.cpus_per_worker", "train.use_gpu"}


# --------------------------------------------------------------------------------------------- config
class Distribution(_Section):
    """One searched value. Exactly one of the fields, e.g. ``{loguniform: [1e-4, 1e-2]}``.

    - ``choice: [a, b, c]``: one of the listed values (numbers, strings, booleans).
    - ``uniform: [low, high]`` / ``loguniform: [low, high]``: a float (log-uniform needs ``low > 0``).
    - ``int: [low, high]``: an integer, both ends included.
    """

    choice: list[Any] | None = None
    uniform: tuple[float, float] | None = None
    loguniform: tuple[float, float] | None = None
    int_: tuple[builtins.int, builtins.int] | None = Field(None, alias="int")

    model_config = {**_Section.model_config, "populate_by_name": True}

    @model_validator(mode="after")
    def _exactly_one(self) -> Distribution:
        given = [k for k in ("choice", "uniform", "loguniform", "int_") if getattr(self, k) is not None]
        if len(given) != 1:
            raise ValueError(
                "give exactly one of choice / uniform / loguniform / int, e.g. {loguniform: [1e-4, 1e-2]} "
                f"(got {[g.rstrip('_') for g in given] or 'none'})"
            )
        if self.choice is not None:
            if not self.choice:
                raise ValueError("choice: give at least one value")
            bad = [v for v in self.choice if not isinstance(v, (bool, builtins.int, float, str))]
            if bad:
                raise ValueError(f"choice values must be numbers, strings or booleans (got {bad!r})")
        for kind in ("uniform", "loguniform", "int_"):
            rng = getattr(self, kind)
            if rng is not None:
                low, high = rng
                if not low < high:
                    raise ValueError(f"{kind.rstrip('_')}: low={low} must be below high={high}")
                if kind == "loguniform" and low <= 0:
                    raise ValueError(f"loguniform: low={low} must be > 0")
        return self

    @property
    def kind(self) -> str:
        for k in ("choice", "uniform", "loguniform", "int_"):
            if getattr(self, k) is not None:
                return k.rstrip("_")
        raise AssertionError("unreachable")

    def endpoints(self) -> list[Any]:
        """The values whose validity stands for the whole distribution (all choices, or both ends)."""
        if self.choice is not None:
            return list(self.choice)
        return list(self.uniform or self.loguniform or self.int_)

    def to_optuna(self) -> Any:
        import optuna.distributions as od

        if self.choice is not None:
            return od.CategoricalDistribution(list(self.choice))
        if self.uniform is not None:
            return od.FloatDistribution(*self.uniform)
        if self.loguniform is not None:
            return od.FloatDistribution(*self.loguniform, log=True)
        return od.IntDistribution(*self.int_)


class AshaConfig(_Section):
    """Asynchronous successive halving: stop trials whose metric trails the others' at each rung."""

    enabled: bool = True
    time_attr: Literal["epoch", "step"] = Field(
        "epoch", description="progress unit of max_t / grace_period: epochs or optimizer steps"
    )
    max_t: int = Field(10, ge=1, description="trial length: sets train.epochs (or train.max_steps for step)")
    grace_period: int = Field(1, ge=1, description="no trial is stopped before this many units")
    reduction_factor: float = Field(2.0, gt=1.0, description="keep about 1/reduction_factor at each rung")

    @model_validator(mode="after")
    def _grace_below_max(self) -> AshaConfig:
        if self.grace_period > self.max_t:
            raise ValueError(f"grace_period={self.grace_period} must be <= max_t={self.max_t}")
        return self


class TrialResources(_Section):
    """What one trial gets: its Train worker group (train.num_workers etc.) and its light driver."""

    workers: int = Field(1, ge=1, description="Ray Train workers per trial (train.num_workers)")
    cpus_per_worker: float = Field(1.0, gt=0.0, description="train.cpus_per_worker")
    use_gpu: bool = Field(False, description="train.use_gpu: one GPU per worker")
    driver_cpus: float = Field(
        0.25, ge=0.0, description="CPUs reserved by the trial's driver (it only builds and watches the run)"
    )


class TuneConfig(_Section):
    """The root of a tuning preset (``tuning/*.yaml``)."""

    name: str = Field("sweep", min_length=1, description="sweep name; re-running the same name resumes")
    output_dir: str = Field(
        "runs/sweeps", description="local path or URI; the sweep lives in output_dir/name"
    )
    base: str = Field(..., min_length=1, description="training preset the trials start from (configs/*.yaml)")
    overrides: list[str] = Field(default_factory=list, description="dotted.key=value applied to base")
    metric: str | list[str] = Field("val_mse", description="metric to optimize, or [metric, bits_per_sample]")
    mode: Literal["min", "max"] | list[Literal["min", "max"]] = "min"
    num_samples: int = Field(8, ge=1, description="number of trials")
    max_concurrent: int = Field(2, ge=1, description="trials running at once")
    seed: int = Field(0, ge=0, description="seed of the Optuna sampler (the trials keep the base's seed)")
    resources_per_trial: TrialResources = Field(default_factory=TrialResources)
    asha: AshaConfig = Field(default_factory=AshaConfig)
    bits_budget: float | None = Field(
        None, gt=0.0, description="bits per sample; codebook_size = 2**round(bits_budget / tokens)"
    )
    latent_shape: list[int] | None = Field(
        None, description="latent (C, H, W); default: read from the base's data.shards manifest"
    )
    space: dict[str, Distribution] = Field(..., description="dotted RunConfig key -> distribution")

    @field_validator("name")
    @classmethod
    def _name_is_path_safe(cls, v: str) -> str:
        if "/" in v or v in {".", ".."}:
            raise ValueError(f"name={v!r} is used as a directory name: use letters, digits, '-', '_' or '.'")
        return v

    @model_validator(mode="after")
    def _objectives(self) -> TuneConfig:
        metrics = self.metrics
        modes = [self.mode] if isinstance(self.mode, str) else list(self.mode)
        if len(metrics) not in (1, 2) or len(modes) != len(metrics):
            raise ValueError(
                f"metric={self.metric!r} / mode={self.mode!r}: give one metric and one mode, or two of each "
                "(e.g. metric: [val_mse, bits_per_sample], mode: [min, min])"
            )
        if len(set(metrics)) != len(metrics):
            raise ValueError(f"metric={self.metric!r}: the two objectives must differ")
        if not self.space:
            raise ValueError("space is empty: give at least one dotted key to search")
        return self

    @property
    def metrics(self) -> list[str]:
        return [self.metric] if isinstance(self.metric, str) else list(self.metric)

    @property
    def modes(self) -> list[str]:
        return [self.mode] if isinstance(self.mode, str) else list(self.mode)

    @property
    def primary_metric(self) -> str:
        return self.metrics[0]


# --------------------------------------------------------------------------------------------- validation
def _is_section(annotation: Any) -> bool:
    return isinstance(annotation, type) and issubclass(annotation, BaseModel)


def check_dotted_key(key: str, root: type[BaseModel] = RunConfig) -> None:
    """Raise :class:`ConfigError` unless ``key`` names a leaf field of ``root`` (e.g. ``train.lr``)."""
    node: type[BaseModel] = root
    parts = key.split(".")
    for i, part in enumerate(parts):
        fields = node.model_fields
        if part not in fields:
            where = ".".join(parts[:i]) or root.__name__
            raise ConfigError(
                f"space key {key!r}: {where} has no field {part!r} (valid: {', '.join(sorted(fields))})"
            )
        ann = fields[part].annotation
        last = i == len(parts) - 1
        if _is_section(ann):
            if last:
                raise ConfigError(
                    f"space key {key!r} is a section: search one of its fields, e.g. {key}.<field>"
                )
            node = ann
        elif not last:
            raise ConfigError(f"space key {key!r}: {'.'.join(parts[: i + 1])} is a value, not a section")


def _get_dotted(data: dict[str, Any], key: str, default: Any = None) -> Any:
    node: Any = data
    for part in key.split("."):
        if not isinstance(node, dict) or part not in node:
            return default
        node = node[part]
    return node


def _set_dotted(data: dict[str, Any], key: str, value: Any) -> None:
    parts = key.split(".")
    node = data
    for part in parts[:-1]:
        node = node.setdefault(part, {})
    node[parts[-1]] = value


def divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def codebook_size_for(bits_budget: float, tokens: int) -> int:
    """``2**round(bits_budget / tokens)``: the codebook that spends about ``bits_budget`` bits per sample."""
    return 2 ** int(round(bits_budget / tokens))


def resolve_base_path(tcfg: TuneConfig, config_path: str | os.PathLike | None = None) -> Path:
    """The base preset: as given (relative to the working directory), else next to the tuning preset, else
    relative to the tuning preset's parent (the repository root for ``tuning/*.yaml``)."""
    p = Path(tcfg.base).expanduser()
    candidates = [p]
    if config_path is not None and not p.is_absolute():
        here = Path(config_path).resolve().parent
        candidates += [here / p, here.parent / p]
    for c in candidates:
        if c.is_file():
            return c
    raise ConfigError(
        f"base={tcfg.base!r}: no such training preset (looked at {', '.join(str(c) for c in candidates)})"
    )


def latent_numel(tcfg: TuneConfig, base: RunConfig) -> int | None:
    """C*H*W of the latents: the preset's ``latent_shape``, else the base's manifest, else the synthetic
    latents the train driver writes when the base asks for them (``train.synthetic_items``); None if none."""
    if tcfg.latent_shape:
        return math.prod(tcfg.latent_shape)
    if not base.data.shards:
        return None
    from revq_ray.data.shards import read_manifest

    try:
        return math.prod(read_manifest(base.data.shards).latent_shape)
    except (FileNotFoundError, OSError, ValueError):
        pass
    if base.train.synthetic_items > 0 and "://" not in base.data.shards:
        return math.prod(base.train.synthetic_latent_shape)
    return None


def validate_space(tcfg: TuneConfig, base_data: dict[str, Any], numel: int | None) -> None:
    """Check every space key and value against the config tree and the latent geometry.

    Raises :class:`ConfigError` naming the key (and the value) at fault.
    """
    for key in tcfg.space:
        check_dotted_key(key)
        if key in _RESERVED_KEYS:
            raise ConfigError(
                f"space key {key!r} is set by the sweep itself (use resources_per_trial / name)"
            )
        if tcfg.asha.enabled and key in ("train.epochs", "train.max_steps"):
            raise ConfigError(f"space key {key!r}: trial length comes from asha.max_t while asha is enabled")
    if tcfg.bits_budget is not None and CODEBOOK_KEY in tcfg.space:
        raise ConfigError(
            f"space key {CODEBOOK_KEY!r}: bits_budget={tcfg.bits_budget} already fixes the codebook size "
            "(2**round(bits/tokens)); search tokens instead, or drop bits_budget"
        )
    tokens_dist = tcfg.space.get(TOKENS_KEY)
    base_tokens = int(_get_dotted(base_data, TOKENS_KEY, RunConfig().model.quantizer.tokens))
    if tokens_dist is not None and tokens_dist.choice is None:
        raise ConfigError(
            f"space key {TOKENS_KEY!r}: tokens must divide the latent size, so give them as a choice "
            "(e.g. {choice: [64, 128, 256]})"
        )
    token_values = [int(v) for v in tokens_dist.choice] if tokens_dist is not None else [base_tokens]
    if numel is not None:
        bad = [t for t in token_values if t <= 0 or numel % t]
        if bad:
            raise ConfigError(
                f"space key {TOKENS_KEY!r}: {bad} do not divide the latent size {numel} "
                f"(C*H*W); valid token counts: {divisors(numel)}"
            )
    if tcfg.bits_budget is not None:
        for t in token_values:
            bits_per_token = tcfg.bits_budget / t
            if round(bits_per_token) < 1 or round(bits_per_token) > 24:
                raise ConfigError(
                    f"bits_budget={tcfg.bits_budget} with tokens={t}: {bits_per_token:.2f} bits per token "
                    "gives "
                    f"codebook_size=2**{round(bits_per_token)}; keep it between 2**1 and 2**24"
                )
    # Every value must make a valid RunConfig on its own (types, bounds, cross-field rules).
    for key, dist in tcfg.space.items():
        for value in dist.endpoints():
            trial = copy.deepcopy(base_data)
            _set_dotted(trial, key, value)
            if tcfg.bits_budget is not None:
                t = int(_get_dotted(trial, TOKENS_KEY, base_tokens))
                _set_dotted(trial, CODEBOOK_KEY, codebook_size_for(tcfg.bits_budget, t))
            try:
                parse_config(trial, RunConfig)
            except ConfigError as err:
                raise ConfigError(
                    f"space key {key!r} value {value!r} makes an invalid training config: {err}"
                ) from None


def load_tune_config(
    path: str | os.PathLike,
    overrides: list[str] | None = None,
    *,
    train_overrides: list[str] | None = None,
    check_data: bool = False,
) -> TuneConfig:
    """Load and validate a tuning preset: the preset itself, its base training preset, and the space.

    ``overrides`` are ``--set`` items for the tuning preset; ``train_overrides`` are appended to its
    ``overrides`` (``--train-set``, applied to the base). With ``check_data`` the base's manifest must be
    readable when the preset gives no ``latent_shape`` (the divisor check needs the latent size).
    """
    try:
        tcfg = parse_config(apply_overrides(load_yaml(path), overrides), TuneConfig)
    except ConfigError as err:
        raise ConfigError(f"{path}: {err}") from None
    if train_overrides:
        tcfg = tcfg.model_copy(update={"overrides": [*tcfg.overrides, *train_overrides]})
    base_path = resolve_base_path(tcfg, path)
    try:
        base_data = apply_overrides(load_yaml(base_path), tcfg.overrides)
        base = parse_config(base_data, RunConfig)
    except ConfigError as err:
        raise ConfigError(f"{path}: base {base_path}: {err}") from None
    numel = latent_numel(tcfg, base)
    if numel is None and check_data:
        raise ConfigError(
            f"{path}: cannot read the latent shape: set latent_shape in the preset, or point the base's "
            f"data.shards (now {base.data.shards!r}) at a finished shard directory"
        )
    try:
        validate_space(tcfg, base_data, numel)
    except ConfigError as err:
        raise ConfigError(f"{path}: {err}") from None
    # Keep where the base was found so trials and best.yaml use the same file.
    return tcfg.model_copy(update={"base": str(base_path)})


def dump_tune_config(tcfg: TuneConfig) -> str:
    """YAML text of a tuning preset, loadable again by :func:`load_tune_config` (unset fields left out)."""
    import yaml

    return yaml.safe_dump(tcfg.model_dump(mode="json", by_alias=True, exclude_none=True), sort_keys=False)


# --------------------------------------------------------------------------------------------- trials
def _absolutize_local(data: dict[str, Any]) -> dict[str, Any]:
    """Trials run in their own directory: make local data paths absolute (URIs stay as they are)."""
    out = copy.deepcopy(data)
    for key in ("data.shards", "data.val_shards"):
        v = _get_dotted(out, key)
        if isinstance(v, str) and v and "://" not in v:
            _set_dotted(out, key, str(Path(v).expanduser().resolve()))
    vae = out.get("vae")
    if isinstance(vae, str) and ":" in vae:
        kind, _, loc = vae.partition(":")
        if loc and "://" not in loc and Path(loc).expanduser().exists():
            out["vae"] = f"{kind}:{Path(loc).expanduser().resolve()}"
    return out


def _join(root: str, *names: str) -> str:
    if "://" in root:
        return "/".join([root.rstrip("/"), *names])
    return str(Path(root, *names))


def trial_config_data(
    tcfg: TuneConfig,
    base_data: dict[str, Any],
    params: dict[str, Any],
    *,
    name: str,
    output_dir: str,
    trial: bool = True,
) -> dict[str, Any]:
    """The full training config (as a plain dict) of one trial: base + sampled ``params`` + sweep settings.

    With ``trial=False`` (best.yaml) the base keeps its own resources and length: the winner is meant to be
    trained for real, not for the sweep's ``asha.max_t``."""
    data = copy.deepcopy(base_data)
    for key, value in params.items():
        _set_dotted(data, key, value)
    if tcfg.bits_budget is not None:
        tokens = int(_get_dotted(data, TOKENS_KEY, RunConfig().model.quantizer.tokens))
        _set_dotted(data, CODEBOOK_KEY, codebook_size_for(tcfg.bits_budget, tokens))
    data["name"] = name
    data["output_dir"] = output_dir
    if not trial:
        return data
    res = tcfg.resources_per_trial
    _set_dotted(data, "train.num_workers", res.workers)
    _set_dotted(data, "train.cpus_per_worker", res.cpus_per_worker)
    _set_dotted(data, "train.use_gpu", res.use_gpu)
    if tcfg.asha.enabled:
        if tcfg.asha.time_attr == "epoch":
            _set_dotted(data, "train.epochs", tcfg.asha.max_t)
        else:
            _set_dotted(data, "train.max_steps", tcfg.asha.max_t)
    return data


def _make_report_callback(extra: dict[str, Any], required: str) -> Any:
    """Train V2's Tune report callback, forwarding only reports that carry ``required`` (the searcher and
    scheduler need it in every result) and adding the trial's constant ``extra`` metrics (bits_per_sample)."""
    from ray.tune.integration.ray_train import TuneReportCallback

    class _ReportToTune(TuneReportCallback):
        def __init__(self) -> None:
            super().__init__()
            self._extra = dict(extra)
            self._required = required

        def after_report(self, run_context, metrics, checkpoint):
            if not metrics or self._required not in metrics[0]:
                return
            super().after_report(run_context, [{**metrics[0], **self._extra}, *metrics[1:]], checkpoint)

    return _ReportToTune()


def _import_builder(spec: str) -> Any:
    import importlib

    module, _, attr = spec.partition(":")
    return getattr(importlib.import_module(module), attr or "build_trainer")


def make_trainable(
    tcfg: TuneConfig, base_data: dict[str, Any], runs_dir: str, builder: str = "revq_ray.train:build_trainer"
):
    """The Tune function run once per trial: build the trial's RunConfig and fit it with the train builder.

    ``builder`` is the import path of ``build_trainer(cfg, *, storage_path, run_name, callbacks)``."""
    tcfg_data = tcfg.model_dump(mode="json", by_alias=True)
    base_data = _absolutize_local(base_data)

    def revq_trial(params: dict[str, Any]) -> None:
        import ray.tune

        build_trainer = _import_builder(builder)
        tc = parse_config(tcfg_data, TuneConfig)
        trial_id = ray.tune.get_context().get_trial_id()
        name = f"trial_{trial_id}"
        cfg = parse_config(
            trial_config_data(tc, base_data, params, name=name, output_dir=runs_dir), RunConfig
        )
        extra = {BITS_METRIC: cfg.model.quantizer.bits_per_sample}
        callback = _make_report_callback(extra, tc.primary_metric)
        # The same builder as `python -m revq_ray.train`: one place sets up data, model and DeepSpeed. The
        # Train run's name is the trial's, so a resumed sweep continues the trial's own checkpoints.
        trainer = build_trainer(cfg, storage_path=runs_dir, run_name=name, callbacks=[callback])
        trainer.fit()

    return revq_trial


# --------------------------------------------------------------------------------------------- sweep
def _trial_dirname(trial: Any) -> str:
    return f"trial_{trial.trial_id}"


def _make_events_callback(path: str | None):
    """A Tune callback appending trial starts/ends to ``trials.jsonl`` (local sweeps): a resumed sweep
    shows which trials it ran again."""
    import ray.tune

    class _TrialEvents(ray.tune.Callback):
        def _log(self, event: str, trial: Any, **more: Any) -> None:
            if path is None:
                return
            with open(path, "a") as f:
                f.write(
                    json.dumps({"event": event, "trial_id": trial.trial_id, "time": time.time(), **more})
                    + "\n"
                )

        def on_trial_start(self, iteration, trials, trial, **info):
            self._log("start", trial)

        def on_trial_complete(self, iteration, trials, trial, **info):
            self._log("complete", trial)

        def on_trial_error(self, iteration, trials, trial, **info):
            self._log("error", trial)

    return _TrialEvents()


def sweep_dir_of(tcfg: TuneConfig) -> str:
    root = tcfg.output_dir if "://" in tcfg.output_dir else str(Path(tcfg.output_dir).expanduser().resolve())
    return _join(root, tcfg.name)


def run_sweep(
    tcfg: TuneConfig,
    *,
    restart_errored: bool = False,
    verbose: int = 1,
    builder: str = "revq_ray.train:build_trainer",
) -> dict[str, Any]:
    """Run (or resume) the sweep described by a validated ``tcfg`` (from :func:`load_tune_config`).

    Uses the running Ray (or starts a local one). ``builder`` is the import path of the trainer builder
    (``revq_ray.train:build_trainer``; another one only for tests of the sweep machinery). Returns
    ``{"sweep_dir", "rows", "best"}`` and writes results.csv / best.yaml / sweep.png (/ pareto.png) into the
    sweep directory.
    """
    import ray
    import ray.tune
    from ray.tune.schedulers import ASHAScheduler, FIFOScheduler
    from ray.tune.search.optuna import OptunaSearch

    if not ray.is_initialized():
        from revq_ray.train.driver import init_ray

        init_ray()

    base_data = apply_overrides(load_yaml(tcfg.base), tcfg.overrides)
    base = parse_config(base_data, RunConfig)
    # Synthetic debug data (train.synthetic_items) is written once here, not by concurrent trials racing.
    from revq_ray.train.driver import _ensure_shards, resolve_paths

    _ensure_shards(resolve_paths(base))
    numel = latent_numel(tcfg, base)
    if numel is None:
        raise ConfigError(
            "cannot read the latent shape for the tokens check: set latent_shape in the tuning preset or "
            "make the base's data.shards point at a finished shard directory"
        )
    validate_space(tcfg, base_data, numel)

    sweep_dir = sweep_dir_of(tcfg)
    storage_path = sweep_dir.rsplit("/", 1)[0]
    runs_dir = _join(sweep_dir, "runs")
    local = "://" not in sweep_dir
    if local:
        Path(sweep_dir).mkdir(parents=True, exist_ok=True)
    events = str(Path(sweep_dir, "trials.jsonl")) if local else None
    trainable = ray.tune.with_resources(
        make_trainable(tcfg, base_data, runs_dir, builder), {"cpu": tcfg.resources_per_trial.driver_cpus}
    )

    if ray.tune.Tuner.can_restore(sweep_dir):
        print(f"[revq-ray tune] resuming the sweep at {sweep_dir} (finished trials are kept)", flush=True)
        _warn_if_changed(tcfg, sweep_dir)
        tuner = ray.tune.Tuner.restore(
            sweep_dir, trainable, resume_unfinished=True, restart_errored=restart_errored
        )
    else:
        _write_text(_join(sweep_dir, "tune_config.yaml"), dump_tune_config(tcfg))
        metrics, modes = tcfg.metrics, tcfg.modes
        searcher = OptunaSearch(
            space={k: d.to_optuna() for k, d in tcfg.space.items()},
            metric=metrics if len(metrics) > 1 else metrics[0],
            mode=modes if len(modes) > 1 else modes[0],
            seed=tcfg.seed,
        )
        if tcfg.asha.enabled:
            # Multi-objective: ASHA can only rank on one number, the first objective.
            scheduler = ASHAScheduler(
                time_attr=tcfg.asha.time_attr,
                metric=metrics[0],
                mode=modes[0],
                max_t=tcfg.asha.max_t,
                grace_period=tcfg.asha.grace_period,
                reduction_factor=tcfg.asha.reduction_factor,
            )
        else:
            scheduler = FIFOScheduler()
        tuner = ray.tune.Tuner(
            trainable,
            tune_config=ray.tune.TuneConfig(
                search_alg=searcher,
                scheduler=scheduler,
                num_samples=tcfg.num_samples,
                max_concurrent_trials=tcfg.max_concurrent,
                trial_dirname_creator=_trial_dirname,
            ),
            run_config=ray.tune.RunConfig(
                name=tcfg.name,
                storage_path=storage_path,
                # Train restarts its own workers (train.max_failures); a failed trial is a result.
                failure_config=ray.tune.FailureConfig(max_failures=0),
                callbacks=[_make_events_callback(events)],
                verbose=verbose,
            ),
        )
    grid = tuner.fit()
    return write_outputs(tcfg, grid, base_data, sweep_dir)


def _warn_if_changed(tcfg: TuneConfig, sweep_dir: str) -> None:
    try:
        saved = _read_text(_join(sweep_dir, "tune_config.yaml"))
    except OSError:
        return
    if saved.strip() != dump_tune_config(tcfg).strip():
        print(
            f"[revq-ray tune] warning: the tuning preset differs from the one this sweep started with "
            f"({_join(sweep_dir, 'tune_config.yaml')}); resuming with the original search settings. Use a "
            "new `name` for a new sweep.",
            file=sys.stderr,
            flush=True,
        )


# --------------------------------------------------------------------------------------------- outputs
def _write_bytes(location: str, data: bytes) -> None:
    from revq_ray.data import fs as _fs

    fs, path = _fs.resolve(location)
    parent = path.rsplit("/", 1)[0]
    _fs.makedirs(fs, parent)
    _fs.write_bytes_atomic(fs, path, data)


def _write_text(location: str, text: str) -> None:
    _write_bytes(location, text.encode())


def _read_text(location: str) -> str:
    from revq_ray.data import fs as _fs

    fs, path = _fs.resolve(location)
    if not _fs.is_file(fs, path):
        raise FileNotFoundError(location)
    return _fs.read_bytes(fs, path).decode()


def _history(result: Any) -> list[dict[str, Any]]:
    df = getattr(result, "metrics_dataframe", None)
    if df is None or len(df) == 0:
        return [result.metrics] if result.metrics else []
    return df.to_dict("records")


def _progress_done(tcfg: TuneConfig, last: dict[str, Any]) -> float | None:
    value = last.get(tcfg.asha.time_attr)
    return float(value) if isinstance(value, (builtins.int, float)) else None


def trial_rows(tcfg: TuneConfig, grid: Any) -> list[dict[str, Any]]:
    """One row per trial: params, derived codebook size / bits, metrics, status, progress."""
    rows = []
    for result in grid:
        params = dict(result.config or {})
        history = _history(result)
        last = history[-1] if history else {}
        trial_id = (result.metrics or {}).get("trial_id") or Path(result.path).name.removeprefix("trial_")
        row: dict[str, Any] = {"trial_id": trial_id}
        for key in tcfg.space:
            row[key] = params.get(key)
        tokens = params.get(TOKENS_KEY)
        if tcfg.bits_budget is not None and tokens is not None:
            row[CODEBOOK_KEY] = codebook_size_for(tcfg.bits_budget, int(tokens))
        for m in dict.fromkeys([*tcfg.metrics, BITS_METRIC, "usage_mean"]):
            row[m] = last.get(m)
        primary = tcfg.primary_metric
        values = [h[primary] for h in history if isinstance(h.get(primary), (builtins.int, float))]
        pick = min if tcfg.modes[0] == "min" else max
        row[f"best_{primary}"] = pick(values) if values else None
        done = _progress_done(tcfg, last)
        row[f"{tcfg.asha.time_attr}s_done"] = done
        row["steps_done"] = last.get("step")
        row["epochs_done"] = last.get("epoch")
        if result.error is not None:
            status = "error"
        elif tcfg.asha.enabled and done is not None and done < tcfg.asha.max_t:
            status = "stopped_early"
        elif not history:
            status = "no_results"
        else:
            status = "completed"
        row["status"] = status
        row["error"] = "" if result.error is None else str(result.error).splitlines()[0][:200]
        # Reports between validations repeat the last validated value: keep one point per validation.
        curve: list[tuple[Any, Any]] = []
        for h in history:
            if primary in h and (not curve or h[primary] != curve[-1][1]):
                curve.append((h.get(tcfg.asha.time_attr), h[primary]))
        row["history"] = curve
        rows.append(row)
    rows.sort(key=lambda r: str(r["trial_id"]))
    return rows


def _pareto_front(points: list[tuple[float, float]], modes: list[str]) -> list[int]:
    """Indices of the non-dominated points (both objectives in ``modes``)."""
    sign = [1.0 if m == "min" else -1.0 for m in modes]
    pts = [(a * sign[0], b * sign[1]) for a, b in points]
    front = []
    for i, (a, b) in enumerate(pts):
        dominated = any((c <= a and d <= b) and (c < a or d < b) for j, (c, d) in enumerate(pts) if j != i)
        if not dominated:
            front.append(i)
    return front


def write_outputs(tcfg: TuneConfig, grid: Any, base_data: dict[str, Any], sweep_dir: str) -> dict[str, Any]:
    """results.csv, best.yaml, sweep.png (+ pareto.png) from a finished ResultGrid."""
    rows = trial_rows(tcfg, grid)
    primary, mode = tcfg.primary_metric, tcfg.modes[0]
    if len(tcfg.metrics) == 2:
        # Two objectives: flag the non-dominated trials (best.yaml is still the best on the first one).
        m0, m1 = tcfg.metrics
        scored = [r for r in rows if all(isinstance(r.get(m), (builtins.int, float)) for m in (m0, m1))]
        front = {id(scored[i]) for i in _pareto_front([(r[m0], r[m1]) for r in scored], tcfg.modes)}
        for r in rows:
            r["pareto_optimal"] = id(r) in front

    # results.csv: one row per trial (the learning curve stays in Tune's per-trial progress.csv).
    columns = [c for c in rows[0] if c != "history"] if rows else ["trial_id"]
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=columns, extrasaction="ignore")
    writer.writeheader()
    for row in rows:
        writer.writerow(row)
    _write_text(_join(sweep_dir, "results.csv"), buf.getvalue())

    # best.yaml: the best trial's full training config, renamed, ready for `python -m revq_ray.train`.
    scored = [r for r in rows if r["status"] != "error" and isinstance(r.get(primary), (builtins.int, float))]
    best = None
    if scored:
        best = (min if mode == "min" else max)(scored, key=lambda r: r[primary])
        params = {k: best[k] for k in tcfg.space}
        data = trial_config_data(
            tcfg,
            base_data,
            params,
            name=f"{tcfg.name}-best",
            output_dir=str(base_data.get("output_dir", RunConfig().output_dir)),
            trial=False,
        )
        cfg = parse_config(data, RunConfig)
        length = f"{tcfg.asha.max_t} {tcfg.asha.time_attr}s" if tcfg.asha.enabled else "the base's length"
        header = (
            f"# Best trial of sweep {tcfg.name!r} (base {tcfg.base}): trial {best['trial_id']}, "
            f"{primary}={best[primary]:.6g} after {length}.\n"
            "# The base's resources and length are kept. Train it:\n"
            "#   python -m revq_ray.train --config best.yaml\n"
        )
        _write_text(_join(sweep_dir, "best.yaml"), header + dump_config(cfg))
    else:
        print("[revq-ray tune] no trial reported the metric; best.yaml not written", file=sys.stderr)

    _write_bytes(_join(sweep_dir, "sweep.png"), _plot_sweep(tcfg, rows))
    if len(tcfg.metrics) == 2:
        _write_bytes(_join(sweep_dir, "pareto.png"), _plot_pareto(tcfg, rows))
    print(format_table(tcfg, rows), flush=True)
    print(f"[revq-ray tune] wrote results.csv, best.yaml, sweep.png to {sweep_dir}", flush=True)
    return {"sweep_dir": sweep_dir, "rows": rows, "best": best}


def format_table(tcfg: TuneConfig, rows: list[dict[str, Any]]) -> str:
    """A plain-text table of the trials, best first."""
    primary, mode = tcfg.primary_metric, tcfg.modes[0]
    cols = ["trial_id", *tcfg.space]
    if tcfg.bits_budget is not None and TOKENS_KEY in tcfg.space:
        cols.append(CODEBOOK_KEY)
    cols += [
        *dict.fromkeys([*tcfg.metrics, BITS_METRIC, "usage_mean"]),
        f"{tcfg.asha.time_attr}s_done",
        "status",
    ]

    def key(r):
        v = r.get(primary)
        ok = isinstance(v, (builtins.int, float))
        return (not ok, (v if mode == "min" else -v) if ok else 0.0)

    def fmt(v):
        if isinstance(v, float):
            return f"{v:.4g}"
        return "" if v is None else str(v)

    body = [[fmt(r.get(c)) for c in cols] for r in sorted(rows, key=key)]
    headers = [c.split(".")[-1] if "." in c else c for c in cols]
    widths = [max(len(h), *(len(b[i]) for b in body)) if body else len(h) for i, h in enumerate(headers)]
    line = lambda cells: "| " + " | ".join(c.ljust(w) for c, w in zip(cells, widths)) + " |"
    out = [line(headers), "|" + "|".join("-" * (w + 2) for w in widths) + "|", *(line(b) for b in body)]
    return "\n".join(out)


_STATUS_COLORS = {
    "completed": "tab:blue",
    "stopped_early": "tab:orange",
    "error": "tab:red",
    "no_results": "0.6",
}


def _plot_sweep(tcfg: TuneConfig, rows: list[dict[str, Any]]) -> bytes:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    primary = tcfg.primary_metric
    keys = list(tcfg.space)
    n = 2 + len(keys)
    ncols = min(3, n)
    nrows = math.ceil(n / ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(4.6 * ncols, 3.6 * nrows), squeeze=False)
    flat = axes.ravel()

    ax = flat[0]
    for i, r in enumerate(rows):
        v = r.get(primary)
        if isinstance(v, (builtins.int, float)):
            ax.bar(i, v, color=_STATUS_COLORS.get(r["status"], "0.5"))
    ax.set_xticks(range(len(rows)), [str(r["trial_id"]) for r in rows], rotation=60, fontsize=7)
    ax.set_title(f"{primary} per trial (last report)")
    present = [s for s in _STATUS_COLORS if any(r["status"] == s for r in rows)]
    handles = [plt.Rectangle((0, 0), 1, 1, color=_STATUS_COLORS[s]) for s in present]
    ax.legend(handles, [s.replace("_", " ") for s in present], fontsize=7)

    ax = flat[1]
    for r in rows:
        pts = [(t, v) for t, v in r["history"] if t is not None and v is not None]
        if pts:
            ax.plot(*zip(*pts), marker="o", ms=3, color=_STATUS_COLORS.get(r["status"], "0.5"), alpha=0.8)
    ax.set_xlabel(tcfg.asha.time_attr)
    ax.set_title(f"{primary} during training (orange: stopped by ASHA)")

    for ax, key in zip(flat[2:], keys):
        dist = tcfg.space[key]
        xs, ys, cs = [], [], []
        for r in rows:
            v = r.get(primary)
            if r.get(key) is not None and isinstance(v, (builtins.int, float)):
                xs.append(r[key])
                ys.append(v)
                cs.append(_STATUS_COLORS.get(r["status"], "0.5"))
        if dist.choice is not None:
            labels = [str(c) for c in dist.choice]
            ax.scatter([labels.index(str(x)) for x in xs], ys, c=cs)
            ax.set_xticks(range(len(labels)), labels, fontsize=8)
        else:
            ax.scatter(xs, ys, c=cs)
            if dist.loguniform is not None:
                ax.set_xscale("log")
                ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
                ax.set_xlim(*dist.loguniform)
            else:
                ax.set_xlim(*(dist.uniform or dist.int_))
        ax.set_xlabel(key)
        ax.set_ylabel(primary)
    for ax in flat[n:]:
        ax.axis("off")
    fig.suptitle(f"sweep {tcfg.name}: {len(rows)} trials")
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    plt.close(fig)
    return buf.getvalue()


def _plot_pareto(tcfg: TuneConfig, rows: list[dict[str, Any]]) -> bytes:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    m0, m1 = tcfg.metrics
    ok = [
        r
        for r in rows
        if isinstance(r.get(m0), (builtins.int, float)) and isinstance(r.get(m1), (builtins.int, float))
    ]
    fig, ax = plt.subplots(figsize=(5.5, 4.2))
    pts = [(r[m1], r[m0]) for r in ok]
    if pts:
        front = _pareto_front([(r[m0], r[m1]) for r in ok], tcfg.modes)
        ax.scatter(*zip(*pts), c=[_STATUS_COLORS.get(r["status"], "0.5") for r in ok], label="trials")
        fpts = sorted(pts[i] for i in front)
        ax.plot(*zip(*fpts), "k--", marker="s", mfc="none", ms=9, label="Pareto front")
        ax.legend(fontsize=8)
    ax.set_xlabel(m1)
    ax.set_ylabel(m0)
    ax.set_title(f"sweep {tcfg.name}: {m0} vs {m1}")
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    plt.close(fig)
    return buf.getvalue()


# --------------------------------------------------------------------------------------------- CLI
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m revq_ray.tune",
        description="Hyperparameter search over revq-ray training (Ray Tune: Optuna + ASHA, one Train run "
        "per trial). Re-running the same command resumes an interrupted sweep.",
    )
    parser.add_argument("--config", required=True, help="tuning preset, e.g. tuning/debug.yaml")
    parser.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a tuning-preset field, e.g. --set num_samples=16 (repeatable)",
    )
    parser.add_argument(
        "--train-set",
        dest="train_overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a field of the base training preset for every trial, e.g. "
        "--train-set data.shards=s3://... (repeatable)",
    )
    parser.add_argument(
        "--address", default=None, help="Ray address (default: RAY_ADDRESS, else a local Ray)"
    )
    parser.add_argument(
        "--num-cpus", type=int, default=None, help="logical CPUs of a local Ray (default: max(8, cores))"
    )
    parser.add_argument(
        "--restart-errored", action="store_true", help="on resume, re-run trials that errored"
    )
    parser.add_argument("--dry-run", action="store_true", help="validate and print the space, run nothing")
    args = parser.parse_args(argv)

    try:
        tcfg = load_tune_config(args.config, args.overrides, train_overrides=args.train_overrides)
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    if args.dry_run:
        print(dump_tune_config(tcfg))
        print(f"sweep directory: {sweep_dir_of(tcfg)}")
        return 0

    import ray

    if not ray.is_initialized():
        from revq_ray.train.driver import init_ray

        # The same start-up as revq_ray.train: join a cluster, or a local Ray with logical CPUs above the
        # core count (with only "cores" of them, concurrent trials' workers and Ray Data starve each other).
        init_ray(args.address, num_cpus=args.num_cpus)
    try:
        out = run_sweep(tcfg, restart_errored=args.restart_errored)
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0 if out["best"] is not None else 1


if __name__ == "__main__":
    # Run the copy imported as ``revq_ray.tune``, not ``__main__``: Ray pickles the trial function by
    # reference to its module, and functions (and pydantic models) of ``__main__`` would go by value.
    from revq_ray.tune import main as _main

    sys.exit(_main())
