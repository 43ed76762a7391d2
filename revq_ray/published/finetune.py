"""``model.init_from``: start training from a saved model (an ``import-revq`` bundle, an export, a run).

The driver calls :func:`check_init_from` while planning (a clear error before any worker starts); each
worker calls :func:`load_init_weights` instead of the sampled codebook init. The saved model's standardizer,
codebook, code counts and rectifier are all loaded: its codes live in its own standardized units, so the
standardizer must come with them (the data's own statistics would shift every code).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from revq_ray.published.convert import PublishedFormatError, check_state

# Settings that fix the shapes of the saved tensors: they must agree with the run's config.
_SHAPE_FIELDS = {
    "quantizer": ("tokens", "codebook_size", "simvq_shared"),
    "rectifier": ("type", "width", "depth", "head_dim", "expand_ratio"),
}
_SAME_MODULES = ({"revq", "vq"}, {"simvq"}, {"gq"})  # quantizer types with the same parameters


def resolve_init_dir(source: str) -> Path:
    """The local directory of a saved ReVQModel named by ``model.init_from`` (downloads a hub repo id)."""
    from revq_ray.tokenizer import resolve_model_dir

    path = Path(source).expanduser()
    if not path.exists() and source.count("/") == 1 and not source.startswith(("/", ".", "~")):
        from huggingface_hub import snapshot_download

        patterns = ["config.json", "model.safetensors", "model/config.json", "model/model.safetensors"]
        try:
            path = Path(snapshot_download(repo_id=source, allow_patterns=patterns))
        except Exception as err:  # noqa: BLE001 - offline, unknown repo, auth
            raise FileNotFoundError(
                f"model.init_from={source}: no such local directory, and not fetchable as a hub repo id "
                f"({type(err).__name__}); write ./{source} for a local path"
            ) from None
    try:
        return resolve_model_dir(path)
    except FileNotFoundError as err:
        raise FileNotFoundError(f"model.init_from={source}: {err}") from None


def _mismatches(run_model: Any, saved_model: dict[str, Any]) -> list[str]:
    """``--set`` fixes that make the run's ``model`` section build the saved model's shapes."""
    fixes = []
    for section, fields in _SHAPE_FIELDS.items():
        mine, theirs = getattr(run_model, section), saved_model.get(section, {})
        for f in fields:
            if f in theirs and getattr(mine, f) != theirs[f]:
                fixes.append(f"model.{section}.{f}={theirs[f]}")
    qt_mine, qt_theirs = run_model.quantizer.type, saved_model.get("quantizer", {}).get("type", "revq")
    if not any(qt_mine in s and qt_theirs in s for s in _SAME_MODULES):
        fixes.append(f"model.quantizer.type={qt_theirs}")
    return fixes


def check_init_from(run_model: Any, latent_shape: list[int] | tuple[int, ...]) -> Path:
    """Check that ``run_model.init_from`` is a saved model this run can start from; returns its directory.

    ``run_model`` is the run's ``ModelConfig``; ``latent_shape`` the shape of the run's latents. Raises
    :class:`revq_ray.config.ConfigError` naming the fields to change.
    """
    from revq_ray.config import ConfigError

    try:
        model_dir = resolve_init_dir(run_model.init_from)
    except FileNotFoundError as err:
        raise ConfigError(str(err)) from None
    saved = json.loads((model_dir / "config.json").read_text())
    if [int(s) for s in saved.get("latent_shape", [])] != [int(s) for s in latent_shape]:
        raise ConfigError(
            f"model.init_from={run_model.init_from}: that model was trained on latents of shape "
            f"{saved.get('latent_shape')}, but data.shards holds latents of shape {list(latent_shape)}: "
            "encode the data with the model's VAE and image size"
        )
    fixes = _mismatches(run_model, saved.get("model", {}))
    if fixes:
        raise ConfigError(
            f"model.init_from={run_model.init_from}: the run's model section builds other shapes than the "
            f"saved model; set {' '.join('--set ' + f for f in fixes)}"
        )
    return model_dir


def load_init_weights(model: Any, source: str | os.PathLike, log: Any = None) -> Path:
    """Load the saved model at ``source`` into ``model`` (a ReVQModel on the CPU); returns its directory.

    Every tensor (standardizer, codebook, counts, rectifier) must exist in both with the same shape; the
    error names the key, both shapes and the config fields behind it. ``log``: a one-argument callable for
    the one-line summary (default: the ``revq_ray.published`` logger).
    """
    import safetensors.torch

    model_dir = resolve_init_dir(str(source))
    saved = json.loads((model_dir / "config.json").read_text())
    if tuple(int(s) for s in saved.get("latent_shape", [])) != tuple(model.latent_shape):
        raise PublishedFormatError(
            f"model.init_from={source}: latent shape {saved.get('latent_shape')} != this model's "
            f"{list(model.latent_shape)}"
        )
    state = safetensors.torch.load_file(str(model_dir / "model.safetensors"))
    want = {k: v.shape for k, v in model.state_dict().items()}
    hint = (
        " (model.quantizer tokens / codebook_size / type and model.rectifier type / width / depth must match)"
    )
    check_state(state, want, f"model.init_from={source}", hint)
    model.load_state_dict(state, strict=True)
    if log is None:
        from revq_ray.runtime import get_logger

        log = get_logger("revq_ray.published").info
    log(
        f"init from {model_dir}: standardizer, codebook "
        f"({model.tokens} x {model.codebook_size}) and {model.cfg.rectifier.type} rectifier loaded "
        "(no sampled codebook init)"
    )
    return model_dir
