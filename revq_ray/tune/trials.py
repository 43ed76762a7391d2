"""One trial: its full training config (base + sampled values + sweep settings) and the Tune function that
builds it and fits it with the trainer builder of ``python -m revq_ray.train``."""

from __future__ import annotations

import copy
from collections.abc import Callable
from pathlib import Path
from typing import Any

from revq_ray.config import SYNTHETIC, RunConfig, parse_config
from revq_ray.runtime import absolute, get_dotted, is_uri, set_dotted
from revq_ray.tune.config import (
    BITS_METRIC,
    CODEBOOK_KEY,
    TOKENIZER,
    TOKENS_KEY,
    TuneConfig,
    codebook_size_for,
    root_config,
    target_of,
)

TrainerBuilder = Callable[..., Any]
"""``build_trainer(cfg, *, storage_path, run_name, callbacks) -> TorchTrainer`` (revq_ray.train's)."""


def absolutize_local(data: dict[str, Any]) -> dict[str, Any]:
    """Trials run in their own directory: make local data paths absolute (URIs stay as they are)."""
    out = copy.deepcopy(data)
    for key in ("data.shards", "data.val_shards", "data.tokens"):  # data.tokens: a prior's sweep
        v = get_dotted(out, key)
        if isinstance(v, str) and v and v != SYNTHETIC:
            set_dotted(out, key, absolute(v))
    vae = out.get("vae")
    if isinstance(vae, str) and ":" in vae:
        kind, _, loc = vae.partition(":")
        # A VAE spec's location may also be a hub id (diffusers:org/name): only existing paths change.
        if loc and not is_uri(loc) and Path(loc).expanduser().exists():
            out["vae"] = f"{kind}:{absolute(loc)}"
    return out


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
        set_dotted(data, key, value)
    if tcfg.bits_budget is not None:
        tokens = int(get_dotted(data, TOKENS_KEY, RunConfig().model.quantizer.tokens))
        set_dotted(data, CODEBOOK_KEY, codebook_size_for(tcfg.bits_budget, tokens))
    data["name"] = name
    data["output_dir"] = output_dir
    if not trial:
        return data
    res = tcfg.resources_per_trial
    set_dotted(data, "train.num_workers", res.workers)
    set_dotted(data, "train.cpus_per_worker", res.cpus_per_worker)
    set_dotted(data, "train.use_gpu", res.use_gpu)
    if tcfg.asha.enabled:
        if tcfg.asha.time_attr == "epoch":
            set_dotted(data, "train.epochs", tcfg.asha.max_t)
        else:
            set_dotted(data, "train.max_steps", tcfg.asha.max_t)
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


def make_trainable(
    tcfg: TuneConfig, base_data: dict[str, Any], runs_dir: str, builder: TrainerBuilder
) -> Callable[[dict[str, Any]], None]:
    """The Tune function run once per trial: build the trial's RunConfig and fit it with ``builder``.

    ``builder`` is ``build_trainer(cfg, *, storage_path, run_name, callbacks)``, normally
    :func:`revq_ray.train.driver.build_trainer` (a prior's sweep: its
    :func:`revq_ray.prior.driver.build_trainer`). The function closes over plain dicts, not pydantic models:
    Ray pickles it, and the trial process rebuilds the configs from JSON-able data."""
    tcfg_data = tcfg.model_dump(mode="json", by_alias=True)
    base_data = absolutize_local(base_data)

    def revq_trial(params: dict[str, Any]) -> None:
        import ray.tune

        tc = parse_config(tcfg_data, TuneConfig)
        trial_id = ray.tune.get_context().get_trial_id()
        name = f"trial_{trial_id}"
        target = target_of(base_data)
        cfg = parse_config(
            trial_config_data(tc, base_data, params, name=name, output_dir=runs_dir), root_config(target)
        )
        extra = {BITS_METRIC: cfg.model.quantizer.bits_per_sample} if target == TOKENIZER else {}
        callback = _make_report_callback(extra, tc.primary_metric)
        # The same builder as `python -m revq_ray.train`: one place sets up data, model and DeepSpeed. The
        # Train run's name is the trial's, so a resumed sweep continues the trial's own checkpoints.
        trainer = builder(cfg, storage_path=runs_dir, run_name=name, callbacks=[callback])
        trainer.fit()

    return revq_trial
