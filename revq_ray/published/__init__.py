"""The ReVQ authors' published tokenizers: import, export, and fine-tuning from a saved model.

    revq-ray import-revq --checkpoint ckpt.pth --config 512T_NC=16384.yaml --stats STATS --output DIR
    revq-ray export-revq --model DIR --output DIR

:func:`import_revq` / :func:`export_revq` convert (``convert.py``); :func:`load_init_weights` and
:func:`check_init_from` implement ``model.init_from`` (``finetune.py``). Nothing here imports Ray.
"""

from __future__ import annotations

from revq_ray.published.convert import (
    DCAE_VAE_SPEC,
    HUB_MODELS,
    PublishedFormatError,
    PublishedSpec,
    export_revq,
    import_revq,
    load_published_checkpoint,
    model_from_published,
    read_published_yaml,
    read_stats,
    spec_from_yaml_dict,
)
from revq_ray.published.finetune import check_init_from, load_init_weights, resolve_init_dir

__all__ = [
    "DCAE_VAE_SPEC",
    "HUB_MODELS",
    "PublishedFormatError",
    "PublishedSpec",
    "check_init_from",
    "export_revq",
    "import_revq",
    "load_init_weights",
    "load_published_checkpoint",
    "model_from_published",
    "read_published_yaml",
    "read_stats",
    "resolve_init_dir",
    "spec_from_yaml_dict",
]
