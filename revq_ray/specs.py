"""Settings that both the pydantic config tree and the pure-PyTorch core know, written once.

The core must import without pydantic (``tests/core/test_boundary.py``) and ``revq_ray.config`` must not
import the core (it sits below it, ``docs/ARCHITECTURE.md``), yet a quantizer's reset settings are both a
config section (``model.quantizer.reset``, validated with the rest of a preset) and plain arguments of
:class:`~revq_ray.core.quantizers.GroupedVQ`. Their names, types, defaults, bounds and descriptions live here,
in plain Python; ``config.ResetConfig`` and ``core.quantizers.ResetParams`` are both built from them.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

__all__ = ["RESET", "Spec"]


@dataclass(frozen=True)
class Spec:
    """One setting: its type, default, description and (for numbers) bounds."""

    type: type
    default: Any
    description: str
    ge: float | None = None
    gt: float | None = None
    le: float | None = None

    def bounds(self) -> dict[str, float]:
        """The bounds as pydantic ``Field`` keywords (``ge``, ``gt``, ``le``)."""
        return {k: v for k, v in (("ge", self.ge), ("gt", self.gt), ("le", self.le)) if v is not None}

    def problem(self, name: str, value: Any) -> str:
        """Why ``value`` is not valid for this setting ("" if it is)."""
        if self.type is not bool and isinstance(value, bool) or not isinstance(value, self.type | int):
            return f"{name}={value!r}: expected {self.type.__name__}"
        if self.ge is not None and value < self.ge:
            return f"{name}={value!r}: must be >= {self.ge}"
        if self.gt is not None and value <= self.gt:
            return f"{name}={value!r}: must be > {self.gt}"
        if self.le is not None and value > self.le:
            return f"{name}={value!r}: must be <= {self.le}"
        return ""


RESET: dict[str, Spec] = {
    "enabled": Spec(bool, True, "reset dead codes at all"),
    "dead_threshold": Spec(int, 1, "a code with fewer hits than this since the last reset is dead", ge=1),
    "ratio": Spec(float, 0.2, "at most this fraction of a group's codes reset at once", gt=0.0, le=1.0),
    "noise": Spec(float, 0.1, "std of the Gaussian noise added to copied codes (standardized units)", ge=0.0),
}
"""Non-activation reset of dead codes (ReVQ): what a reset does. When it runs (``interval``, ``unit``) is the
trainer's business and only in ``config.ResetConfig``."""
