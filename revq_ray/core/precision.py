"""Where reduced precision is allowed: only the rectifier.

DeepSpeed's ``torch_autocast`` (and any ``torch.autocast`` a user wraps around a forward) casts every matmul
to bf16. For the nearest-code search that is wrong, not just imprecise: the scores of neighbouring codes
differ in the 3rd-4th significant digit, bf16 keeps about 3, and under CPU bf16 autocast 4-9 % of tokens
picked another code than the fp32 search (measured at e163450). The search, the code gather, the codebook
update and the quantizer's losses therefore run in fp32 with autocast switched off around them, so training
(under autocast) and the Tokenizer (fp32) pick the same codes. The rectifier may run in bf16.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch

# Device types torch.autocast knows; anything else (e.g. "meta") is covered by turning off CPU autocast.
_AUTOCAST_DEVICE_TYPES = ("cpu", "cuda", "xpu", "mps", "hpu")


def _autocast_type(device: torch.device | str) -> str:
    t = torch.device(device).type
    return t if t in _AUTOCAST_DEVICE_TYPES else "cpu"


@contextlib.contextmanager
def full_precision(device: torch.device | str) -> Iterator[None]:
    """Run the block with autocast off for ``device``'s type (a no-op when autocast is not on)."""
    dt = _autocast_type(device)
    if torch.is_autocast_enabled(dt):
        with torch.autocast(device_type=dt, enabled=False):
            yield
    else:
        yield


def as_fp32(t: torch.Tensor | None) -> torch.Tensor | None:
    """``t`` as float32 if it is a lower-precision float tensor (bf16/fp16), else unchanged."""
    if t is None or not t.is_floating_point() or t.dtype in (torch.float32, torch.float64):
        return t
    return t.float()
