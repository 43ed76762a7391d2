"""Stop a run whose numbers stopped being numbers, before anything non-finite is checkpointed or exported.

A loss that turns NaN/Inf (absurd latents such as 1e30, a too-large lr, an fp overflow) does not heal: every
later step trains on garbage. The training loop calls :func:`check_window` each time it has reduced a
window of losses over all ranks (every log/validation/checkpoint step), *before* it saves a checkpoint or
an export. Every rank sees the same all-reduced sums, so every rank raises at the same step and no rank is
left waiting in a collective.
"""

from __future__ import annotations

import math

import torch


class NonFiniteError(RuntimeError):
    """Training produced a NaN/Inf loss or parameter; the message names the step (``.step``)."""

    def __init__(self, message: str, step: int):
        super().__init__(message)
        self.step = step

    def __reduce__(self):  # Ray ships worker errors to the driver by pickle
        return (type(self), (str(self), self.step))


def nonfinite_params(module: torch.nn.Module) -> list[str]:
    """Names of ``module``'s parameters and floating-point buffers that hold a NaN or Inf."""
    bad = []
    with torch.no_grad():
        for name, t in (*module.named_parameters(), *module.named_buffers()):
            if t.is_floating_point() and t.numel() and not bool(torch.isfinite(t).all()):
                bad.append(name)
    return bad


def check_window(
    loss_sum: float, steps: float, step: int, *, first_step: int, module: torch.nn.Module | None = None
) -> None:
    """Raise :class:`NonFiniteError` if the window of steps ``first_step..step`` had a non-finite loss, or
    (when ``module`` is given, i.e. before a checkpoint or export) if any parameter is non-finite.

    ``loss_sum`` is the sum of the per-step losses over the window (all ranks), ``steps`` how many were
    summed. Call it with the all-reduced values so that every rank decides alike.
    """
    where = f"step {step}" if first_step >= step else f"steps {first_step}-{step}"
    if not math.isfinite(loss_sum):
        raise NonFiniteError(
            f"non-finite loss ({loss_sum} summed over {int(steps)} step(s)) at {where}: training stopped at "
            f"step {step}; nothing from this window is checkpointed or exported. Check the latents (values "
            "far outside the VAE's range overflow the standardizer) or lower train.lr",
            step,
        )
    if module is not None:
        bad = nonfinite_params(module)
        if bad:
            raise NonFiniteError(
                f"non-finite parameters at step {step} ({', '.join(bad[:5])}): training stopped before "
                "checkpointing or exporting them",
                step,
            )


def failure_message(err: BaseException) -> str:
    """The line of a failed run's error that says why: a :class:`NonFiniteError`'s message when the worker
    raised one (Ray wraps it in its own error with the worker's traceback), else the error's first line."""
    texts = [str(err)]
    for rank, worker_err in sorted(getattr(err, "worker_failures", {}).items()):
        texts.append(f"rank {rank}: {type(worker_err).__name__}: {worker_err}")
    text = "\n".join(texts)
    for line in text.splitlines():
        if line.startswith("non-finite "):
            return line.strip()
        if "NonFiniteError:" in line:
            return line.split("NonFiniteError:", 1)[1].strip()
    if len(texts) > 1:  # a worker's own error says more than Ray's wrapper
        return texts[1].strip().splitlines()[0]
    first = text.strip().splitlines()[0] if text.strip() else ""
    return f"{type(err).__name__}: {first}"
