"""Ray Data pipeline for VAE latents: encode media to webdataset shards, stream them back, sample for init.

Importing this package does not import or start Ray: names resolve lazily on first use.

- :mod:`revq_ray.data.shards`: ``ShardWriter``, ``Manifest``, ``read_manifest``, ``write_shard``
- :mod:`revq_ray.data.synthetic`: ``write_synthetic_shards``
- :mod:`revq_ray.data.reader`: ``latent_dataset``, ``train_val_datasets``, ``sample_init_latents``,
  ``sample_init_tokens``
- :mod:`revq_ray.data.encode`: ``encode_to_shards`` (behind ``python -m revq_ray.encode``)
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "ShardWriter": "shards",
    "ShardInfo": "shards",
    "Manifest": "shards",
    "read_manifest": "shards",
    "write_shard": "shards",
    "write_synthetic_shards": "synthetic",
    "synthetic_latents": "synthetic",
    "LatentDataError": "reader",
    "latent_dataset": "reader",
    "train_val_datasets": "reader",
    "sample_init_latents": "reader",
    "sample_init_tokens": "reader",
    "encode_to_shards": "encode",
    "EncodeResult": "encode",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        module = importlib.import_module(f"revq_ray.data.{_EXPORTS[name]}")
        return getattr(module, name)
    raise AttributeError(f"module 'revq_ray.data' has no attribute {name!r}")


def __dir__() -> list[str]:
    return __all__
