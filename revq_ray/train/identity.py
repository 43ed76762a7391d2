"""Run identity: re-running a name resumes only the run it names.

A run folder ``<output_dir>/<name>`` holds ``run_identity.json``: the config keys a checkpoint depends on
(the model, the optimizer recipe, the seed, the hold-out) and the identity of the data (a sha256 of each
``manifest.json``, which lists every shard's count and sha256). Re-running the same name with a checkpoint
present resumes only when both match; otherwise the driver stops before any worker starts with
``run NAME already exists in OUTPUT_DIR with other settings: <key: old -> new, ...>``. Settings that only
say how long or where to run (epochs, max_steps, workers, CPUs, logging and checkpoint cadence, the paths
themselves) may change between runs. ``train.force_resume=true`` resumes anyway and records the new
settings.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any

from revq_ray.config import ConfigError, RunConfig
from revq_ray.data import fs as _fs

IDENTITY_FILE = "run_identity.json"

# Keys that may differ on resume (dotted). Everything else in the config must match: a key added later is
# protected by default.
MAY_CHANGE = frozenset(
    {
        "name",
        "output_dir",
        "vae",
        "data.shards",  # compared by content (manifest sha256), not by path
        "data.val_shards",
        "data.shuffle_buffer",
        "data.prefetch_batches",
        "data.init_samples",  # used only when a run starts from scratch
        "train.num_workers",  # the checkpoint loader handles another world size
        "train.use_gpu",
        "train.cpus_per_worker",
        "train.torch_threads",
        "train.epochs",
        "train.max_steps",
        "train.log_every",
        "train.val_every",
        "train.checkpoint_every",
        "train.keep_checkpoints",
        "train.max_failures",
        "train.fail_at_step",
        "train.resources_per_worker",
        "train.export_all_ranks",
        "train.synthetic_items",
        "train.synthetic_latent_shape",
        "train.channels_last",
        "train.force_resume",
    }
)


def _flatten(d: dict[str, Any], prefix: str = "", keep: frozenset[str] = MAY_CHANGE) -> dict[str, Any]:
    """``{dotted key: value}`` of a nested dict; the dicts named in ``keep`` stay whole (one key)."""
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict) and v and key not in keep:
            out.update(_flatten(v, key + ".", keep))
        else:
            out[key] = v
    return out


def manifest_sha256(shards: str) -> str:
    """sha256 of ``<shards>/manifest.json`` ("" when ``shards`` is empty)."""
    if not shards:
        return ""
    fs, root = _fs.resolve(shards)
    return hashlib.sha256(_fs.read_bytes(fs, _fs.join(root, "manifest.json"))).hexdigest()


def run_identity(cfg: RunConfig) -> dict[str, Any]:
    """What must match for a checkpoint of ``cfg``'s run to be resumed: ``{dotted key: value}``."""
    flat = _flatten(cfg.model_dump(mode="json"))
    ident = {k: v for k, v in flat.items() if k not in MAY_CHANGE}
    ident["data.shards (manifest sha256)"] = manifest_sha256(cfg.data.shards)
    ident["data.val_shards (manifest sha256)"] = manifest_sha256(cfg.data.val_shards)
    return ident


def _has_checkpoint(fs: Any, run_root: str) -> bool:
    import pyarrow.fs as pafs

    if not _fs.exists(fs, run_root):
        return False
    infos = fs.get_file_info(pafs.FileSelector(run_root, recursive=False))
    return any(i.type == pafs.FileType.Directory and i.base_name.startswith("checkpoint_") for i in infos)


def _short(v: Any) -> str:
    text = json.dumps(v)
    return text if len(text) <= 40 else text[:16] + "..." + text[-8:]


def check_run_identity(cfg: RunConfig, storage_path: str, name: str) -> None:
    """Record ``cfg``'s identity in ``<storage_path>/<name>``, or raise :class:`ConfigError` when that run
    already has a checkpoint written under other settings (unless ``train.force_resume``)."""
    # A key added to the config after the run started is not a change when it holds its default (the
    # default keeps the old meaning, e.g. model.layout=contiguous): upgrading revq-ray keeps runs resumable.
    defaults = _flatten(RunConfig().model_dump(mode="json"))
    check_identity(run_identity(cfg), storage_path, name, force=cfg.train.force_resume, defaults=defaults)


def check_identity(
    new: dict[str, Any], storage_path: str, name: str, *, force: bool, defaults: dict[str, Any]
) -> None:
    """The rule of :func:`check_run_identity` for any identity ``{dotted key: value}`` (the prior's too):
    record it in ``<storage_path>/<name>``, or raise :class:`ConfigError` listing the keys that differ from
    the recorded one when the run has a checkpoint (unless ``force``). A key missing from the recorded
    identity that holds its value in ``defaults`` is no change."""
    fs, root = _fs.resolve(storage_path)
    run_root = _fs.join(root, name)
    path = _fs.join(run_root, IDENTITY_FILE)
    if _fs.is_file(fs, path) and _has_checkpoint(fs, run_root):
        old = json.loads(_fs.read_bytes(fs, path))
        diff = [
            f"{k}: {_short(old.get(k))} -> {_short(new.get(k))}"
            for k in sorted(set(old) | set(new))
            if old.get(k) != new.get(k) and not (k not in old and k in defaults and new[k] == defaults[k])
        ]
        if diff and not force:
            raise ConfigError(
                f"run {name} already exists in {storage_path} with other settings: {'; '.join(diff)}. "
                "Choose another name (or output_dir) for a new run, or pass --set train.force_resume=true "
                "to resume its checkpoint under the new settings"
            )
        if diff:
            print(f"[revq_ray.train] train.force_resume: resuming {name} with {'; '.join(diff)}", flush=True)
    _fs.makedirs(fs, run_root)
    _fs.write_bytes_atomic(fs, path, json.dumps(new, indent=1, sort_keys=True).encode())
