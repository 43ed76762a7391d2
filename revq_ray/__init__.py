"""revq-ray: turn a frozen, pre-trained VAE into a discrete tokenizer (ReVQ, SimVQ, GQ), with Ray + DeepSpeed.

``import revq_ray`` is cheap: it imports neither torch nor Ray nor DeepSpeed. The public classes are loaded
on first access::

    from revq_ray import ReVQModel          # revq_ray.core.model (pure PyTorch)
    from revq_ray import Tokenizer          # revq_ray.tokenizer (VAE + ReVQModel: media <-> ids)
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

# name -> module that defines it; imported on first attribute access (PEP 562).
_LAZY = {
    "ReVQModel": "revq_ray.core.model",
    "ModelOut": "revq_ray.core.model",
    "Tokenizer": "revq_ray.tokenizer",
}

__all__ = ["__version__", *_LAZY]

if TYPE_CHECKING:  # pragma: no cover - for type checkers and IDEs only
    from revq_ray.core.model import ModelOut, ReVQModel  # noqa: F401
    from revq_ray.tokenizer import Tokenizer  # noqa: F401


def __getattr__(name: str) -> Any:
    module_name = _LAZY.get(name)
    if module_name is None:
        raise AttributeError(f"module 'revq_ray' has no attribute {name!r}")
    value = getattr(importlib.import_module(module_name), name)
    globals()[name] = value  # cache: later accesses skip __getattr__
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))
