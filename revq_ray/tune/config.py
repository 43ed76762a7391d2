"""The search-space side of a sweep: the tuning preset (:class:`TuneConfig`), its validation against the
training config tree and the latent geometry, and loading / dumping it.

Nothing here needs Ray: ``python -m revq_ray.tune --dry-run`` and the preset tests use only this module.
"""

from __future__ import annotations

import builtins
import copy
import math
import os
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, Field, field_validator, model_validator

from revq_ray.config import (
    SYNTHETIC,
    ConfigError,
    RunConfig,
    Section,
    apply_overrides,
    load_yaml,
    parse_config,
    path_safe_name,
)
from revq_ray.runtime import get_dotted, set_dotted

TOKENS_KEY = "model.quantizer.tokens"
TOKENIZER, PRIOR = "tokenizer", "prior"
CODEBOOK_KEY = "model.quantizer.codebook_size"
BITS_METRIC = "bits_per_sample"
# Keys a sweep sets itself: sampling them would be silently overwritten.
RESERVED_KEYS = {"name", "output_dir", "train.num_workers", "train.cpus_per_worker", "train.use_gpu"}


class Distribution(Section):
    """One searched value. Exactly one of the fields, e.g. ``{loguniform: [1e-4, 1e-2]}``.

    - ``choice: [a, b, c]``: one of the listed values (numbers, strings, booleans).
    - ``uniform: [low, high]`` / ``loguniform: [low, high]``: a float (log-uniform needs ``low > 0``).
    - ``int: [low, high]``: an integer, both ends included.
    """

    choice: list[Any] | None = None
    uniform: tuple[float, float] | None = None
    loguniform: tuple[float, float] | None = None
    int_: tuple[builtins.int, builtins.int] | None = Field(None, alias="int")

    model_config = {**Section.model_config, "populate_by_name": True}

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


class AshaConfig(Section):
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


class TrialResources(Section):
    """What one trial gets: its Train worker group (train.num_workers etc.) and its light driver."""

    workers: int = Field(1, ge=1, description="Ray Train workers per trial (train.num_workers)")
    cpus_per_worker: float = Field(1.0, gt=0.0, description="train.cpus_per_worker")
    use_gpu: bool = Field(False, description="train.use_gpu: one GPU per worker")
    driver_cpus: float = Field(
        0.25, ge=0.0, description="CPUs reserved by the trial's driver (it only builds and watches the run)"
    )


class TuneConfig(Section):
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
        return path_safe_name(v)

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


def target_of(base_data: dict[str, Any]) -> str:
    """What a sweep's trials train, from its base preset: the stage-2 prior (a ``configs/prior_*.yaml``:
    ``data.tokens``, trained by :mod:`revq_ray.prior`) or the tokenizer (anything else, revq_ray.train)."""
    from revq_ray.prior.config import is_prior_preset

    return PRIOR if is_prior_preset(base_data) else TOKENIZER


def root_config(target: str) -> type[BaseModel]:
    """The config tree a trial of ``target`` is validated against."""
    if target == PRIOR:
        from revq_ray.prior.config import PriorRunConfig

        return PriorRunConfig
    return RunConfig


def default_builder(target: str) -> Any:
    """``build_trainer(cfg, *, storage_path, run_name, callbacks)`` of ``target``: the tokenizer's
    (:func:`revq_ray.train.driver.build_trainer`) or the prior's
    (:func:`revq_ray.prior.driver.build_trainer`),
    the ones their own commands use."""
    if target == PRIOR:
        from revq_ray.prior.driver import build_trainer
    else:
        from revq_ray.train.driver import build_trainer
    return build_trainer


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
    latents the train driver writes when the base asks for them (``data.shards: synthetic``); None if none."""
    if tcfg.latent_shape:
        return math.prod(tcfg.latent_shape)
    if not base.data.shards:
        return None
    if base.data.shards == SYNTHETIC:
        return math.prod(base.train.synthetic_latent_shape)
    from revq_ray.data.shards import read_manifest

    try:
        return math.prod(read_manifest(base.data.shards).latent_shape)
    except (FileNotFoundError, OSError, ValueError):
        pass
    return None


def validate_space(tcfg: TuneConfig, base_data: dict[str, Any], numel: int | None) -> None:
    """Check every space key and value against the config tree and the latent geometry.

    Raises :class:`ConfigError` naming the key (and the value) at fault. A prior's sweep (:func:`target_of`)
    checks its keys against :class:`~revq_ray.prior.config.PriorRunConfig`; the tokens, codebook and bits
    rules are the tokenizer's and do not apply to it.
    """
    target = target_of(base_data)
    root = root_config(target)
    for key in tcfg.space:
        check_dotted_key(key, root)
        if key in RESERVED_KEYS:
            raise ConfigError(
                f"space key {key!r} is set by the sweep itself (use resources_per_trial / name)"
            )
        if tcfg.asha.enabled and key in ("train.epochs", "train.max_steps"):
            raise ConfigError(f"space key {key!r}: trial length comes from asha.max_t while asha is enabled")
    if target == PRIOR:
        if tcfg.bits_budget is not None:
            raise ConfigError("bits_budget: a prior's sweep has no codebook to size (the tokens fix it)")
        _check_values(tcfg, base_data, root)
        return
    if tcfg.bits_budget is not None and CODEBOOK_KEY in tcfg.space:
        raise ConfigError(
            f"space key {CODEBOOK_KEY!r}: bits_budget={tcfg.bits_budget} already fixes the codebook size "
            "(2**round(bits/tokens)); search tokens instead, or drop bits_budget"
        )
    tokens_dist = tcfg.space.get(TOKENS_KEY)
    base_tokens = int(get_dotted(base_data, TOKENS_KEY, RunConfig().model.quantizer.tokens))
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
    _check_values(tcfg, base_data, RunConfig, base_tokens)


def _check_values(
    tcfg: TuneConfig, base_data: dict[str, Any], root: type[BaseModel], base_tokens: int = 0
) -> None:
    """Every value must make a valid training config on its own (types, bounds, cross-field rules)."""
    for key, dist in tcfg.space.items():
        for value in dist.endpoints():
            trial = copy.deepcopy(base_data)
            set_dotted(trial, key, value)
            if tcfg.bits_budget is not None:
                t = int(get_dotted(trial, TOKENS_KEY, base_tokens))
                set_dotted(trial, CODEBOOK_KEY, codebook_size_for(tcfg.bits_budget, t))
            try:
                parse_config(trial, root)
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
        base = parse_config(base_data, root_config(target_of(base_data)))
    except ConfigError as err:
        raise ConfigError(f"{path}: base {base_path}: {err}") from None
    numel = latent_numel(tcfg, base) if target_of(base_data) == TOKENIZER else 0
    if numel is None and check_data:  # (0: a prior's sweep, which has no latents)
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


def pareto_front(points: list[tuple[float, float]], modes: list[str]) -> list[int]:
    """Indices of the non-dominated points (both objectives in ``modes``)."""
    sign = [1.0 if m == "min" else -1.0 for m in modes]
    pts = [(a * sign[0], b * sign[1]) for a, b in points]
    front = []
    for i, (a, b) in enumerate(pts):
        dominated = any((c <= a and d <= b) and (c < a or d < b) for j, (c, d) in enumerate(pts) if j != i)
        if not dominated:
            front.append(i)
    return front
