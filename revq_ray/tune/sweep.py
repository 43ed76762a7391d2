"""The sweep driver: Optuna (seeded) + ASHA over one Ray Train run per trial, resumable from its directory."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

from revq_ray.config import SYNTHETIC, ConfigError, RunConfig, apply_overrides, load_yaml, parse_config
from revq_ray.runtime import absolute, get_logger, init_ray, is_uri, join_location, set_dotted
from revq_ray.tune.config import (
    PRIOR,
    TuneConfig,
    default_builder,
    dump_tune_config,
    latent_numel,
    root_config,
    target_of,
    validate_space,
)
from revq_ray.tune.outputs import read_text, write_outputs, write_text
from revq_ray.tune.trials import TrainerBuilder, make_trainable

_log = get_logger("revq_ray.tune")


def _trial_dirname(trial: Any) -> str:
    return f"trial_{trial.trial_id}"


def _make_events_callback(path: str | None):
    """A Tune callback appending trial starts/ends to ``trials.jsonl`` (local sweeps): a resumed sweep
    shows which trials it ran again."""
    import ray.tune

    class _TrialEvents(ray.tune.Callback):
        def _append(self, event: str, trial: Any, **more: Any) -> None:
            if path is None:
                return
            with open(path, "a") as f:
                f.write(
                    json.dumps({"event": event, "trial_id": trial.trial_id, "time": time.time(), **more})
                    + "\n"
                )

        def on_trial_start(self, iteration, trials, trial, **info):
            self._append("start", trial)

        def on_trial_complete(self, iteration, trials, trial, **info):
            self._append("complete", trial)

        def on_trial_error(self, iteration, trials, trial, **info):
            self._append("error", trial)

    return _TrialEvents()


def sweep_dir_of(tcfg: TuneConfig) -> str:
    """``<output_dir>/<name>`` (local paths absolute), where the sweep's state and outputs live."""
    return join_location(absolute(tcfg.output_dir), tcfg.name)


def _prepare_base(tcfg: TuneConfig) -> dict[str, Any]:
    """The base training config as a dict, its synthetic shards written once (not by trials racing), and
    the space checked against the latent size; raises :class:`ConfigError` when the size is unknown."""
    from revq_ray.train.plan import ensure_shards, resolve_paths

    base_data = apply_overrides(load_yaml(tcfg.base), tcfg.overrides)
    if target_of(base_data) == PRIOR:  # a prior's sweep: its token dataset is checked by each trial's plan
        parse_config(base_data, root_config(PRIOR))
        validate_space(tcfg, base_data, None)
        return base_data
    base = parse_config(base_data, RunConfig)
    resolved = resolve_paths(base)
    ensure_shards(resolved)
    if base.data.shards == SYNTHETIC:  # every trial reads the copy written here, not one of its own
        set_dotted(base_data, "data.shards", resolved.data.shards)
    numel = latent_numel(tcfg, base)
    if numel is None:
        raise ConfigError(
            "cannot read the latent shape for the tokens check: set latent_shape in the tuning preset or "
            "make the base's data.shards point at a finished shard directory"
        )
    validate_space(tcfg, base_data, numel)
    return base_data


def _new_tuner(
    tcfg: TuneConfig,
    trainable: Any,
    storage_path: str,
    events: str | None,
    verbose: int,
    asha_records: str | None = None,
) -> Any:
    """A fresh ``Tuner``: Optuna's (multi-objective) TPE, ASHA on the first objective (or FIFO); ASHA's rung
    records go to ``asha_records`` (local sweeps) so that a resume keeps stopping weak trials."""
    import ray.tune
    from ray.tune.schedulers import FIFOScheduler
    from ray.tune.search.optuna import OptunaSearch

    from revq_ray.tune.asha import ResumableASHA

    metrics, modes = tcfg.metrics, tcfg.modes
    searcher = OptunaSearch(
        space={k: d.to_optuna() for k, d in tcfg.space.items()},
        metric=metrics if len(metrics) > 1 else metrics[0],
        mode=modes if len(modes) > 1 else modes[0],
        seed=tcfg.seed,
    )
    if tcfg.asha.enabled:
        # Multi-objective: ASHA can only rank on one number, the first objective.
        scheduler = ResumableASHA(
            records=asha_records,
            time_attr=tcfg.asha.time_attr,
            metric=metrics[0],
            mode=modes[0],
            max_t=tcfg.asha.max_t,
            grace_period=tcfg.asha.grace_period,
            reduction_factor=tcfg.asha.reduction_factor,
        )
    else:
        scheduler = FIFOScheduler()
    return ray.tune.Tuner(
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


def run_sweep(
    tcfg: TuneConfig,
    *,
    restart_errored: bool = False,
    verbose: int = 1,
    builder: TrainerBuilder | None = None,
) -> dict[str, Any]:
    """Run (or resume) the sweep described by a validated ``tcfg`` (from :func:`load_tune_config`).

    Uses the running Ray (or starts a local one like ``python -m revq_ray.train``). ``builder`` builds each
    trial's trainer; default :func:`revq_ray.train.driver.build_trainer` (another one only for tests of the
    sweep machinery). Returns ``{"sweep_dir", "rows", "best"}`` and writes results.csv / best.yaml /
    sweep.png (/ pareto.png) into the sweep directory.
    """
    import ray.tune

    init_ray()
    base_data = _prepare_base(tcfg)
    if builder is None:  # the tokenizer's trainer, or the prior's when the base is a prior preset
        builder = default_builder(target_of(base_data))

    sweep_dir = sweep_dir_of(tcfg)
    storage_path = sweep_dir.rsplit("/", 1)[0]
    runs_dir = join_location(sweep_dir, "runs")
    local = not is_uri(sweep_dir)
    if local:
        Path(sweep_dir).mkdir(parents=True, exist_ok=True)
    events = str(Path(sweep_dir, "trials.jsonl")) if local else None
    trainable = ray.tune.with_resources(
        make_trainable(tcfg, base_data, runs_dir, builder), {"cpu": tcfg.resources_per_trial.driver_cpus}
    )

    if ray.tune.Tuner.can_restore(sweep_dir):
        _log.info("resuming the sweep at %s (finished trials are kept)", sweep_dir)
        _warn_if_changed(tcfg, sweep_dir)
        tuner = ray.tune.Tuner.restore(
            sweep_dir, trainable, resume_unfinished=True, restart_errored=restart_errored
        )
    else:
        write_text(join_location(sweep_dir, "tune_config.yaml"), dump_tune_config(tcfg))
        asha_records = str(Path(sweep_dir, "asha_records.json")) if local else None
        tuner = _new_tuner(tcfg, trainable, storage_path, events, verbose, asha_records)
    grid = tuner.fit()
    return write_outputs(tcfg, grid, base_data, sweep_dir)


def _warn_if_changed(tcfg: TuneConfig, sweep_dir: str) -> None:
    try:
        saved = read_text(join_location(sweep_dir, "tune_config.yaml"))
    except OSError:
        return
    if saved.strip() != dump_tune_config(tcfg).strip():
        _log.warning(
            "warning: the tuning preset differs from the one this sweep started with (%s); resuming with the "
            "original search settings. Use a new `name` for a new sweep.",
            join_location(sweep_dir, "tune_config.yaml"),
        )
