"""The prior's typed config tree (``configs/prior_*.yaml``): pydantic, unknown keys rejected, like
:mod:`revq_ray.config`. Load with :func:`load_prior_config` (``--set a.b=c`` overrides as everywhere)."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from pydantic import Field, field_validator, model_validator

from revq_ray.config import Section, load_config, path_safe_name


class PriorDataConfig(Section):
    """The token dataset (a ``revq-ray tokenize`` output directory, see docs/ARCHITECTURE.md)."""

    tokens: str = Field("", description="the token dataset: a `revq-ray tokenize` output directory (or URI)")
    val_items: int = Field(
        512,
        ge=0,
        description="source images held out for validation (chosen by a stable hash of their keys; their "
        "flipped copies are left out of training too)",
    )
    augmented: bool = Field(
        True, description="train on the flipped copies the dataset holds (`tokenize --augment flip`) too"
    )
    limit: int = Field(0, ge=0, description="read at most this many items (0 = all): smoke tests")

    @field_validator("tokens")
    @classmethod
    def _absolute(cls, v: str) -> str:
        # Ray workers do not share the driver's working directory: local paths become absolute.
        from revq_ray.runtime import is_uri

        v = v.strip()
        return v if not v or is_uri(v) else str(Path(v).expanduser().resolve())


class PriorModelConfig(Section):
    """The transformer (revq_ray/prior/model.py says what each choice means)."""

    d_model: int = Field(128, ge=8, description="width D")
    layers: int = Field(4, ge=1)
    heads: int = Field(4, ge=1)
    mlp_ratio: float = Field(4.0, gt=0.0)
    dropout: float = Field(0.0, ge=0.0, lt=1.0)
    embedding: Literal["table", "codebook"] = Field(
        "table",
        description="table: one learned vector per (position t, code k); codebook: the code's own vector "
        "(the dataset's codebooks.safetensors, frozen) through a learned linear map",
    )
    head: Literal["shared", "per_position"] = Field(
        "shared",
        description="K logits per position, always among that position's codebook: shared = one (D, K) head "
        "for every position; per_position = a (D, K) head per position (T*D*K weights)",
    )
    conditional: Literal["auto", "yes", "no"] = Field(
        "auto",
        description="class-conditional: yes needs class labels in the dataset (an error names the file "
        "otherwise); auto = when the dataset has them; no = ignore labels",
    )
    cfg_dropout: float = Field(
        0.1, ge=0.0, le=1.0, description="share of training labels replaced by the null class (for CFG)"
    )

    @model_validator(mode="after")
    def _heads_divide(self) -> PriorModelConfig:
        if self.d_model % self.heads:
            raise ValueError(f"d_model={self.d_model} must be a multiple of heads={self.heads}")
        return self


class PriorTrainConfig(Section):
    """How to train: the Ray Train + DeepSpeed settings of revq_ray.train (same names, same meaning)."""

    num_workers: int = Field(1, ge=1)
    use_gpu: bool = False
    cpus_per_worker: float = Field(1.0, gt=0.0)
    torch_threads: int = Field(1, ge=1, description="torch.set_num_threads per worker")
    zero_stage: int = Field(0, ge=0, le=2)
    precision: Literal["auto", "fp32", "bf16"] = Field("auto", description="auto: bf16 on GPU, fp32 on CPU")
    fused_optimizer: bool = Field(True, description="torch's fused AdamW kernel")
    batch_size: int = Field(64, ge=1, description="global batch (split across workers)")
    epochs: int = Field(10, ge=1)
    max_steps: int = Field(0, ge=0, description="stop after this many optimizer steps; 0 = epochs decide")
    lr: float = Field(3e-4, gt=0.0)
    warmup_steps: int = Field(
        100, ge=0, description="linear warm-up, then cosine decay to lr*final_lr_fraction"
    )
    final_lr_fraction: float = Field(0.1, ge=0.0, le=1.0)
    weight_decay: float = Field(
        0.05, ge=0.0, description="AdamW decay of the matrices (not of norms, biases)"
    )
    grad_clip: float = Field(1.0, ge=0.0, description="gradient-norm clip (0 = off)")
    log_every: int = Field(50, ge=1)
    val_every: int = Field(0, ge=0, description="steps between validations; 0 = every epoch end")
    checkpoint_every: int = Field(0, ge=0, description="steps between checkpoints; 0 = every epoch end")
    keep_checkpoints: int = Field(2, ge=1)
    max_failures: int = Field(2, ge=0)
    fail_at_step: int = Field(-1, description="test hook: rank 0 exits at this step, once (-1 = never)")
    resources_per_worker: dict[str, float] = Field(default_factory=dict)
    force_resume: bool = Field(False, description="resume a run whose checkpoint has other settings or data")


class PriorRunConfig(Section):
    """The root of a prior preset (``configs/prior_*.yaml``)."""

    name: str = Field("prior", min_length=1, description="run name; re-running the same name resumes")
    output_dir: str = Field("runs", description="local path or URI for checkpoints, logs and exports")
    seed: int = Field(0, ge=0)
    data: PriorDataConfig = Field(default_factory=PriorDataConfig)
    model: PriorModelConfig = Field(default_factory=PriorModelConfig)
    train: PriorTrainConfig = Field(default_factory=PriorTrainConfig)

    @field_validator("name")
    @classmethod
    def _name_is_path_safe(cls, v: str) -> str:
        return path_safe_name(v)


def load_prior_config(path: str | Path, overrides: list[str] | None = None) -> PriorRunConfig:
    """Load a prior preset, apply ``--set`` overrides, validate (:class:`~revq_ray.config.ConfigError`
    naming every bad field)."""
    return load_config(path, overrides, cls=PriorRunConfig)


def is_prior_preset(data: dict[str, Any]) -> bool:
    """Whether a preset's YAML (as a dict) is a prior preset (its ``data`` section names ``tokens``)."""
    return isinstance(data.get("data"), dict) and "tokens" in data["data"]
