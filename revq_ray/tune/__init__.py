"""Hyperparameter search over revq-ray training: one Ray Train run per trial, Optuna (seeded) + ASHA.

    python -m revq_ray.tune --config tuning/debug.yaml [--set num_samples=8] [--train-set train.lr=3e-3]

A tuning preset (``tuning/*.yaml``, :class:`TuneConfig`) names a training preset (``base``, a
``configs/*.yaml`` file, plus ``overrides``) and a search ``space`` of dotted
:class:`~revq_ray.config.RunConfig` keys. Each trial is a Ray Tune function that builds the trial's full
RunConfig (base + overrides + sampled values + per-trial resources) and runs it with the same
:func:`revq_ray.train.driver.build_trainer` that ``python -m revq_ray.train`` uses (passed in as a callable),
with Train V2's Tune report callback so worker reports reach Tune (and ASHA can stop a trial between
reports).

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

Where things are: :mod:`~revq_ray.tune.config` (the preset and its search space, validation),
:mod:`~revq_ray.tune.trials` (one trial's config and the Tune function), :mod:`~revq_ray.tune.sweep` (the
sweep driver), :mod:`~revq_ray.tune.outputs` (results.csv, best.yaml, the table), :mod:`~revq_ray.tune.plots`
and :mod:`~revq_ray.tune.cli`.
"""

from __future__ import annotations

from revq_ray.tune.cli import build_parser, main
from revq_ray.tune.config import (
    BITS_METRIC,
    CODEBOOK_KEY,
    TOKENS_KEY,
    AshaConfig,
    Distribution,
    TrialResources,
    TuneConfig,
    check_dotted_key,
    codebook_size_for,
    divisors,
    dump_tune_config,
    latent_numel,
    load_tune_config,
    pareto_front,
    resolve_base_path,
    validate_space,
)
from revq_ray.tune.outputs import format_table, trial_rows, write_outputs
from revq_ray.tune.sweep import run_sweep, sweep_dir_of
from revq_ray.tune.trials import TrainerBuilder, make_trainable, trial_config_data

__all__ = [
    "BITS_METRIC",
    "CODEBOOK_KEY",
    "TOKENS_KEY",
    "AshaConfig",
    "Distribution",
    "TrainerBuilder",
    "TrialResources",
    "TuneConfig",
    "build_parser",
    "check_dotted_key",
    "codebook_size_for",
    "divisors",
    "dump_tune_config",
    "format_table",
    "latent_numel",
    "load_tune_config",
    "main",
    "make_trainable",
    "pareto_front",
    "resolve_base_path",
    "run_sweep",
    "sweep_dir_of",
    "trial_config_data",
    "trial_rows",
    "validate_space",
    "write_outputs",
]
