"""Every "is it due?" of the training loop in one place: log, validate, checkpoint, reset, usage.

The loop calls :meth:`Schedule.advance` once per optimizer step; it moves the step/epoch counters of the
:class:`~revq_ray.train.checkpoint.TrainerState` and says what is due after that step. Pure Python, so the
rules are unit-tested without Ray or DeepSpeed.
"""

from __future__ import annotations

from dataclasses import dataclass

from revq_ray.config import ResetConfig, TrainConfig
from revq_ray.train.checkpoint import TrainerState


@dataclass(frozen=True)
class Due:
    """What to do after a step. ``usage``: the code-usage statistics are needed (they cost an all-reduce of
    the (G, K) counts, 512 MiB at 256T-L, so only resets, validations, checkpoints and the last step get
    them; plain log steps do not)."""

    log: bool = False
    val: bool = False
    ckpt: bool = False
    reset: bool = False
    last: bool = False

    @property
    def usage(self) -> bool:
        return self.reset or self.val or self.ckpt or self.last

    @property
    def report(self) -> bool:
        """Anything to report (metrics line, CSV row, Ray report)."""
        return self.log or self.val or self.ckpt or self.last

    @property
    def any(self) -> bool:
        return self.report or self.reset


class Schedule:
    """When to log, validate, checkpoint and reset, from the config and the run's planned sizes.

    - log every ``train.log_every`` steps;
    - validate every ``train.val_every`` steps (0: at every epoch end) and after the last step;
    - checkpoint every ``train.checkpoint_every`` steps (0: at every epoch end) and after the last step;
    - reset every ``reset.interval`` ``reset.unit`` (steps or epochs) when resets are on, never after the
      last step (it would only throw the counts away).
    """

    def __init__(
        self,
        train: TrainConfig,
        reset: ResetConfig,
        steps_per_epoch: int,
        total_steps: int,
        *,
        resets_on: bool,
    ):
        if steps_per_epoch < 1 or total_steps < 0:
            raise ValueError(f"steps_per_epoch={steps_per_epoch}, total_steps={total_steps}")
        self.train, self.reset = train, reset
        self.steps_per_epoch, self.total_steps = steps_per_epoch, total_steps
        self.resets_on = resets_on

    def done(self, state: TrainerState) -> bool:
        return state.step >= self.total_steps

    def advance(self, state: TrainerState, samples: int) -> Due:
        """Count one finished optimizer step of ``samples`` latents (all ranks) and return what is due."""
        state.step += 1
        state.step_in_epoch += 1
        state.samples += samples
        epoch_end = state.step_in_epoch >= self.steps_per_epoch
        if epoch_end:
            state.epoch += 1
            state.step_in_epoch = 0
        return self.due(state.step, state.epoch, epoch_end)

    def due(self, step: int, epoch: int, epoch_end: bool) -> Due:
        tc = self.train
        last = step >= self.total_steps
        val = (step % tc.val_every == 0) if tc.val_every else epoch_end
        ckpt = (step % tc.checkpoint_every == 0) if tc.checkpoint_every else epoch_end
        reset = False
        if self.resets_on and not last:
            if self.reset.unit == "steps":
                reset = step % self.reset.interval == 0
            else:
                reset = epoch_end and epoch % self.reset.interval == 0
        return Due(log=step % tc.log_every == 0, val=val or last, ckpt=ckpt or last, reset=reset, last=last)
