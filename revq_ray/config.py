"""Typed, validated configuration tree for revq-ray.

Every section is a pydantic model with ``extra="forbid"``: an unknown or misspelled key is an error that
names the key, never silently ignored. Presets are YAML files (``configs/*.yaml``, ``tuning/*.yaml``)
loaded with :func:`load_config`; ``--set a.b=c`` overrides use dotted keys (:func:`apply_overrides`).

This module imports only pydantic and PyYAML so that every layer (core included) can use it.
"""

from __future__ import annotations

import copy
import math
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    create_model,
    field_validator,
    model_validator,
)

from revq_ray.runtime import set_dotted
from revq_ray.specs import RESET


class ConfigError(ValueError):
    """A configuration value is invalid. The message names the dotted field and the fix."""


class Section(BaseModel):
    """Base of every config section: unknown keys are errors, and assignments are validated too."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)


def path_safe_name(v: str) -> str:
    """``v`` if it can name a directory (a run's or a sweep's ``name``); else a ValueError naming the fix."""
    if "/" in v or v in {".", ".."}:
        raise ValueError(f"name={v!r} is used as a directory name: use letters, digits, '-', '_' or '.'")
    return v


# --------------------------------------------------------------------------------------------- core
ResetConfig = create_model(
    "ResetConfig",
    __base__=Section,
    __doc__="Non-activation reset of dead codes (ReVQ): what a reset does (revq_ray.specs.RESET, shared with "
    "the core's ResetParams) and when it runs.",
    **{name: (spec.type, Field(spec.default, description=spec.description, **spec.bounds()))
       for name, spec in RESET.items()},
    interval=(int, Field(1, ge=1, description="reset every `interval` units")),
    unit=(Literal["epochs", "steps"], "epochs"),
)  # fmt: skip


class QuantizerConfig(Section):
    """Which quantizer, and its knobs.

    ``tokens`` groups of ``codebook_size`` codes, each of dimension latent_size / tokens."""

    type: Literal["revq", "vq", "simvq", "gq"] = "revq"
    tokens: int = Field(512, ge=1, description="T = number of tokens (= groups) per latent")
    codebook_size: int = Field(16384, ge=2, description="K = codes per group")
    loss: Literal["decoupled", "joint"] = Field(
        "decoupled",
        description="revq/vq: the reference's decoupled losses, or one straight-through objective",
    )
    beta: float = Field(0.25, ge=0.0, description="commitment weight (simvq, joint revq/vq)")
    init: Literal["sample", "kmeans++", "random"] = "sample"
    kmeans_iters: int = Field(0, ge=0, description="Lloyd iterations after k-means++ seeding (init=kmeans++)")
    search_budget_mb: float = Field(
        0.0,
        ge=0.0,
        description="peak extra memory of the nearest-code search, however large K is; 0 = auto (256 MB on"
        " CPU, a quarter of the free GPU memory, at most 16 GiB)",
    )
    reset: ResetConfig = Field(default_factory=ResetConfig)
    simvq_shared: bool = Field(False, description="simvq: one linear map shared by all groups")
    simvq_seed: int = Field(
        0, ge=0, description="simvq: seed of the frozen random codebook and the map's init"
    )
    gq_beta: float = Field(1.0, ge=0.0, description="gq: prior weight in the log-ratio score")
    gq_seed: int = Field(0, ge=0, description="gq: seed of the scrambled Sobol prior samples")

    @model_validator(mode="after")
    def _method_rules(self) -> QuantizerConfig:
        if self.type == "vq":
            # Plain VQ is the ablation: no reset. Users ask for it by name, so force it off.
            object.__setattr__(self.reset, "enabled", False)
        return self

    @property
    def bits_per_sample(self) -> float:
        return self.tokens * math.log2(self.codebook_size)


class RectifierConfig(Section):
    """The post-quantization rectifier (revq_ray/core/rectifiers.py); it starts as the identity.

    vit: EfficientViT blocks as in ReVQ (512T: width 512, depth 3, about 14 M parameters); cnn: DC-AE residual
    conv blocks; mlp: per-position 1x1 MLP blocks; identity: no rectifier; dcae: the ReVQ authors' decoder key
    for key (revq_ray/core/rectifiers_published.py; what ``revq-ray import-revq`` builds).
    """

    type: Literal["vit", "cnn", "mlp", "identity", "dcae"] = "vit"
    width: int = Field(512, ge=1, description="channels inside the rectifier (W)")
    depth: int = Field(3, ge=0, description="number of blocks (L); 0 = stem and head only")
    head_dim: int = Field(32, ge=1, description="vit: attention head dimension")
    expand_ratio: float = Field(4.0, gt=0.0, description="vit/mlp: hidden expansion of the feed-forward")

    @model_validator(mode="after")
    def _vit_heads(self) -> RectifierConfig:
        if self.type in ("vit", "dcae") and self.width % self.head_dim:
            raise ValueError(
                f"rectifier.width={self.width} must be a multiple of rectifier.head_dim={self.head_dim} "
                f"for {self.type} (the attention heads split the width)"
            )
        if self.type == "dcae" and self.expand_ratio != 4.0:
            raise ValueError(
                f"rectifier.expand_ratio={self.expand_ratio}: type=dcae uses diffusers' EfficientViTBlock, "
                "whose feed-forward expands by 4; leave expand_ratio at 4"
            )
        return self


class ModelConfig(Section):
    """What :class:`revq_ray.core.model.ReVQModel` is built from (saved in its config.json)."""

    quantizer: QuantizerConfig = Field(default_factory=QuantizerConfig)
    rectifier: RectifierConfig = Field(default_factory=RectifierConfig)
    layout: Literal["contiguous", "position"] = Field(
        "contiguous",
        description="how the latent is cut into tokens: contiguous (ReVQ's: a token is d values of one "
        "channel) or position (a token is C/P channels at one position, T = positions x P); see "
        "revq_ray/core/layout.py",
    )
    weighting: Literal["none", "decoder"] = Field(
        "none",
        description="none: every standardized channel counts alike; decoder: weigh each channel by the "
        "frozen decoder's sensitivity to it (diag of J^T J, measured once when the run is planned, saved "
        "with the model), so the code search and the losses follow the decoded output; needs the run's `vae`",
    )
    weighting_samples: int = Field(
        64,
        ge=1,
        le=4096,
        description="weighting=decoder: latents the sensitivity averages over (4 sign probes each)",
    )
    init_from: str = Field(
        "",
        description="fine-tune: start from this saved model (a save_pretrained / import-revq directory, a "
        "Tokenizer bundle, or a hub repo id owner/name; write ./dir for a local dir) instead of a sampled "
        "codebook init; its standardizer, codebook and rectifier are loaded, so the quantizer and rectifier "
        "settings above must match its shapes",
    )

    @model_validator(mode="after")
    def _weighting_rules(self) -> ModelConfig:
        if self.weighting != "none" and self.quantizer.type == "gq":
            raise ValueError(
                "model.weighting=decoder does not apply to model.quantizer.type=gq (GQ scores codes in the "
                "VAE's raw units against its prior); use weighting: none"
            )
        return self

    @field_validator("init_from")
    @classmethod
    def _init_from_is_absolute(cls, v: str) -> str:
        # Local paths become absolute (Ray workers do not share the driver's working directory); a hub repo
        # id ("owner/name", not an existing path) stays as it is. Existence and shapes are checked when the
        # run is planned (revq_ray.published.check_init_from), not here (workers and reloads re-validate).
        v = v.strip()
        if not v or v.startswith("/"):
            return v
        is_hub_id = v.count("/") == 1 and not v.startswith((".", "~")) and not Path(v).expanduser().exists()
        return v if is_hub_id else str(Path(v).expanduser().resolve())


# --------------------------------------------------------------------------------------------- data
SYNTHETIC = "synthetic"
"""``data.shards: synthetic``: train on synthetic latents (``train.synthetic_items`` of
``train.synthetic_latent_shape``), written once under ``<output_dir>/synthetic/``. The only way to get them:
a path without a manifest is an error, never a silent fallback to random numbers."""


class DataConfig(Section):
    """Where the latent shards live (written by ``python -m revq_ray.encode``)."""

    shards: str = Field(
        "",
        description="directory or URI holding manifest.json and *.tar latent shards; `synthetic` = synthetic"
        " latents for smoke tests (train.synthetic_items of train.synthetic_latent_shape)",
    )
    val_shards: str = Field(
        "", description="separate validation shards; empty: hold out `val_items` from train"
    )
    val_items: int = Field(512, ge=0, description="latents held out for validation when val_shards is empty")
    shuffle_buffer: int = Field(2048, ge=0, description="local shuffle buffer (items) per worker; 0 = off")
    init_samples: int = Field(
        0, ge=0, description="latents drawn for codebook init; 0 = enough for codebook_size unique tokens"
    )
    prefetch_batches: int = Field(2, ge=0)


# --------------------------------------------------------------------------------------------- train
class TrainConfig(Section):
    num_workers: int = Field(1, ge=1)
    use_gpu: bool = False
    cpus_per_worker: float = Field(1.0, gt=0.0, description="fractional CPUs leave room for Ray Data")
    torch_threads: int = Field(1, ge=1, description="torch.set_num_threads per worker")
    zero_stage: int = Field(0, ge=0, le=3)
    precision: Literal["auto", "fp32", "bf16"] = Field("auto", description="auto: bf16 on GPU, fp32 on CPU")
    batch_size: int = Field(256, ge=1, description="global batch size (split across workers)")
    epochs: int = Field(100, ge=1)
    max_steps: int = Field(0, ge=0, description="stop after this many optimizer steps; 0 = epochs decide")
    steps_per_epoch: int = Field(0, ge=0, description="0 = derived from the manifest's count")
    lr: float = Field(1e-3, gt=0.0, description="codebook learning rate")
    rectifier_lr_scale: float = Field(0.05, gt=0.0, description="rectifier lr = lr * this")
    rectifier_weight_decay: float = Field(1e-4, ge=0.0)
    final_lr_fraction: float = Field(0.05, gt=0.0, le=1.0, description="exponential decay to lr * this")
    grad_clip: float = Field(1.0, ge=0.0, description="per-module gradient-norm clip (0 = off)")
    codebook_update: Literal["auto", "rows_lazy", "rows", "dense"] = Field(
        "auto",
        description="how the codebook's gradient travels between workers and is applied (revq_ray/train/"
        "codebook.py). rows_lazy: only the rows a step touched are all-gathered and summed, and a lazy "
        "row-sparse AdamW updates only those rows (untouched rows keep their moments and do not move; dense "
        "AdamW decays and moves them). rows: the same row exchange, then torch's AdamW over the whole "
        "codebook (the dense update exactly, to rounding). dense: DeepSpeed all-reduces the whole (G, K, d) "
        "gradient and steps it (ZeRO 1/2 then partition the codebook's optimizer state too; under rows* it "
        "is replicated). auto: rows_lazy for revq/vq with a rectifier, dense otherwise (simvq, gq)",
    )
    fused_optimizer: bool = Field(
        True,
        description="torch's fused AdamW kernel (CPU and CUDA): same results to rounding, far fewer passes",
    )
    channels_last: bool | None = Field(
        None,
        description="rectifier convs in channels_last layout (faster; same results to rounding); ZeRO stage 0"
        " only. None = auto: on at ZeRO stage 0, off otherwise",
    )
    log_every: int = Field(50, ge=1, description="steps between metric reports")
    val_every: int = Field(0, ge=0, description="steps between validation passes; 0 = once per epoch")
    checkpoint_every: int = Field(0, ge=0, description="steps between checkpoints; 0 = once per epoch")
    keep_checkpoints: int = Field(2, ge=1)
    max_failures: int = Field(2, ge=0, description="worker-group restarts from the last checkpoint")
    fail_at_step: int = Field(-1, description="test hook: rank 0 exits at this step, once (-1 = never)")
    resources_per_worker: dict[str, float] = Field(
        default_factory=dict, description="extra Ray resources per worker (e.g. a custom node label resource)"
    )
    export_all_ranks: bool = Field(
        False,
        description="test hook: every rank writes its final state to <run_dir>/ranks/rank<r>.safetensors",
    )
    synthetic_items: int = Field(
        1024, ge=1, description="data.shards: synthetic: how many synthetic latents to write (once)"
    )
    synthetic_latent_shape: list[int] = Field(
        default_factory=lambda: [16, 8, 8], description="data.shards: synthetic: their latent shape"
    )
    force_resume: bool = Field(
        False,
        description="resume a run whose checkpoint was written under other settings or data (see "
        "revq_ray.train.identity); off: such a re-run stops with the differing keys",
    )


# --------------------------------------------------------------------------------------------- run
class RunConfig(Section):
    """The root of a training preset (``configs/*.yaml``)."""

    name: str = Field("run", min_length=1, description="run name; re-running the same name resumes")
    output_dir: str = Field("runs", description="local path or URI (s3://...) for checkpoints and logs")
    seed: int = Field(0, ge=0)
    vae: str = Field(
        "", description="VAE spec for decoded metrics: diffusers:<id|dir>, taesd:<dir>, builtin:<dir>"
    )
    data: DataConfig = Field(default_factory=DataConfig)
    model: ModelConfig = Field(default_factory=ModelConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)

    @field_validator("name")
    @classmethod
    def _name_is_path_safe(cls, v: str) -> str:
        return path_safe_name(v)


# --------------------------------------------------------------------------------------------- loading
def _format_error(err: ValidationError, root: str) -> str:
    lines = []
    for e in err.errors():
        loc = ".".join(str(p) for p in e["loc"]) or root
        if e["type"] == "extra_forbidden":
            lines.append(f"{loc}: unknown key (check its spelling; see revq_ray/config.py for valid keys)")
        else:
            lines.append(f"{loc}: {e['msg']} (got {e.get('input')!r})")
    return "invalid configuration:\n  " + "\n  ".join(lines)


def parse_config(data: dict[str, Any], cls: type[BaseModel] = RunConfig) -> Any:
    """Validate a plain dict into ``cls``; raise :class:`ConfigError` naming every bad field."""
    try:
        return cls.model_validate(data)
    except ValidationError as err:
        raise ConfigError(_format_error(err, cls.__name__)) from None


def _coerce_scalar(text: str) -> Any:
    # YAML gives the same typing rules as the preset files: 1 -> int, 1e-3 -> float, true -> bool.
    return yaml.safe_load(text) if text != "" else ""


def apply_overrides(data: dict[str, Any], overrides: list[str] | None) -> dict[str, Any]:
    """Return a copy of ``data`` with ``key.sub=value`` overrides applied (values parsed as YAML)."""
    out = copy.deepcopy(data)
    for item in overrides or []:
        if "=" not in item:
            raise ConfigError(f"override {item!r}: expected dotted.key=value, e.g. train.epochs=2")
        key, value = item.split("=", 1)
        try:
            set_dotted(out, key, _coerce_scalar(value))
        except ValueError as err:
            raise ConfigError(f"override {item!r}: {err}") from None
    return out


def load_yaml(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {str(path)!r} does not exist")
    data = yaml.safe_load(path.read_text()) or {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: the top level must be a mapping of sections")
    return data


def load_config(
    path: str | Path, overrides: list[str] | None = None, cls: type[BaseModel] = RunConfig
) -> Any:
    """Load a YAML preset, apply ``--set`` overrides, and validate it."""
    try:
        return parse_config(apply_overrides(load_yaml(path), overrides), cls)
    except ConfigError as err:
        raise ConfigError(f"{path}: {err}") from None


def dump_config(cfg: BaseModel) -> str:
    """YAML text of a config, loadable again by :func:`load_config`."""
    return yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False)
