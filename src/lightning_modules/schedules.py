"""Learning-rate schedules laid out over the run's progress: its steps, or its time budget.

Short runs gain most from a high learning rate held for most of the run and a sharp decay at the
end. A run can end two ways, by `trainer.max_steps` or by `trainer.max_time`; on a slow or busy
machine the time cap comes first, and a schedule keyed to steps alone would never reach its
decay. So progress is the larger of the two fractions, steps done over `total_steps` and time
spent over `max_time`, and the decay points are fractions of that progress. The spent time is
part of the scheduler's state, so resuming continues where the run left off.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Mapping, Sequence
from datetime import timedelta
from typing import Any

from torch.optim import Optimizer
from torch.optim.lr_scheduler import LRScheduler

from src.errors import ConfigError

Clock = Callable[[], float]
# scale(step, progress) -> the multiplier of the base learning rates; progress runs 0 -> 1.
Scale = Callable[[int, float], float]


def duration_seconds(value: str | Mapping[str, int] | timedelta | None) -> float | None:
    """Seconds of a Lightning `max_time` ("DD:HH:MM:SS", a dict of timedelta fields, or a
    timedelta); None for no limit."""
    if value is None:
        return None
    if isinstance(value, timedelta):
        return value.total_seconds()
    if isinstance(value, Mapping):
        try:
            return timedelta(**dict(value)).total_seconds()
        except TypeError as err:
            raise ConfigError(f"trainer.max_time={dict(value)} is not a duration: {err}") from err
    parts = str(value).strip().split(":")
    try:
        days, hours, minutes, seconds = (int(p) for p in parts)
    except ValueError as err:
        raise ConfigError(f'trainer.max_time={value!r}: write it as "DD:HH:MM:SS"') from err
    return timedelta(days=days, hours=hours, minutes=minutes, seconds=seconds).total_seconds()


class ProgressSchedule(LRScheduler):
    """Base rates times `scale(step, progress)`, progress = max(step / total_steps,
    time spent / max_time).

    Time is counted from the first training step, as Lightning's `max_time` counts it from the
    start of training (validation included); `clock` is injectable for tests.
    """

    def __init__(
        self,
        optimizer: Optimizer,
        scale: Scale,
        total_steps: int,
        max_time: str | Mapping[str, int] | timedelta | None = None,
        clock: Clock = time.monotonic,
    ) -> None:
        if total_steps is None or total_steps <= 0:
            raise ConfigError(
                f"a step-keyed learning-rate schedule needs trainer.max_steps > 0, "
                f"got {total_steps}"
            )
        budget = duration_seconds(max_time)
        if budget is not None and budget <= 0:
            raise ConfigError(f"trainer.max_time={max_time!r} must be a positive duration")
        self.scale = scale
        self.total_steps = int(total_steps)
        self.time_budget = budget
        self.clock = clock
        self.elapsed = 0.0
        self._last_tick: float | None = None
        self._ticking = False  # the constructor's own first step() does not start the clock
        super().__init__(optimizer)
        self._ticking = True

    def progress(self) -> float:
        """How far the run is, 0 -> 1: the larger of its step and time fractions."""
        by_steps = self.last_epoch / self.total_steps
        by_time = self.elapsed / self.time_budget if self.time_budget else 0.0
        return min(1.0, max(by_steps, by_time))

    def step(self, epoch: int | None = None) -> None:
        if self._ticking:
            now = self.clock()
            if self._last_tick is not None:
                self.elapsed += now - self._last_tick
            self._last_tick = now
        super().step(epoch)

    def get_lr(self) -> list[float]:
        factor = self.scale(self.last_epoch, self.progress())
        return [base * factor for base in self.base_lrs]

    _TRANSIENT = ("optimizer", "scale", "clock", "_last_tick", "_ticking", "total_steps")

    def state_dict(self) -> dict[str, Any]:
        """Plain values (loadable with `weights_only=True`): the step, the time spent, the rates.
        Not the length and time budget, which come from the config (a resumed run may change
        them), nor the clock's last reading (another process's clock means nothing here)."""
        state = {k: v for k, v in self.__dict__.items() if k not in self._TRANSIENT}
        state.pop("time_budget", None)
        return state


def _warmup(step: int, warmup_steps: int) -> float:
    return min(1.0, (step + 1) / warmup_steps) if warmup_steps > 0 else 1.0


def step_decay(
    optimizer: Optimizer,
    total_steps: int,
    milestones: Sequence[float] = (0.8, 0.95),
    factor: float = 0.1,
    warmup_steps: int = 0,
    max_time: str | Mapping[str, int] | timedelta | None = None,
    clock: Clock = time.monotonic,
) -> ProgressSchedule:
    """Linear warm-up over steps, then multiply the rate by `factor` at each fraction of the
    run's progress (steps or time, whichever runs out first)."""
    bounds = sorted(float(m) for m in milestones)

    def scale(step: int, progress: float) -> float:
        # A hair of slack: progress k / total must reach a milestone at exactly that step.
        passed = sum(progress + 1e-9 >= b for b in bounds)
        return _warmup(step, warmup_steps) * factor**passed

    return ProgressSchedule(optimizer, scale, total_steps, max_time, clock)


def warmup_cosine(
    optimizer: Optimizer,
    total_steps: int,
    warmup_steps: int = 0,
    final_scale: float = 0.01,
    max_time: str | Mapping[str, int] | timedelta | None = None,
    clock: Clock = time.monotonic,
) -> ProgressSchedule:
    """Linear warm-up, then cosine decay to `final_scale` times the base rate at the end of the
    run (its last step or its time budget, whichever comes first)."""

    def scale(step: int, progress: float) -> float:
        if warmup_steps > 0 and step < warmup_steps:
            return (step + 1) / warmup_steps
        effective = progress * total_steps  # the step this point of the run stands for
        t = min(1.0, max(0.0, (effective - warmup_steps) / max(1, total_steps - warmup_steps)))
        return final_scale + (1 - final_scale) * 0.5 * (1 + math.cos(math.pi * t))

    return ProgressSchedule(optimizer, scale, total_steps, max_time, clock)
