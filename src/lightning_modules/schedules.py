"""Learning-rate schedules keyed to the run's length in optimiser steps.

Short runs gain most from a high learning rate held for most of the run and a sharp decay at the
end; these factories build that as `LambdaLR`s so resuming restores them exactly.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

from torch.optim import Optimizer
from torch.optim.lr_scheduler import LambdaLR

from src.errors import ConfigError


def _check_total(total_steps: int) -> None:
    if total_steps is None or total_steps <= 0:
        raise ConfigError(
            f"a step-keyed learning-rate schedule needs trainer.max_steps > 0, got {total_steps}"
        )


def step_decay(
    optimizer: Optimizer,
    total_steps: int,
    milestones: Sequence[float] = (0.8, 0.95),
    factor: float = 0.1,
    warmup_steps: int = 0,
) -> LambdaLR:
    """Linear warm-up, then multiply the rate by `factor` at each fraction of `total_steps`."""
    _check_total(total_steps)
    bounds = sorted(int(m * total_steps) for m in milestones)

    def scale(step: int) -> float:
        warm = min(1.0, (step + 1) / warmup_steps) if warmup_steps > 0 else 1.0
        return warm * factor ** sum(step >= b for b in bounds)

    return LambdaLR(optimizer, scale)


def warmup_cosine(
    optimizer: Optimizer, total_steps: int, warmup_steps: int = 0, final_scale: float = 0.01
) -> LambdaLR:
    """Linear warm-up, then cosine decay to `final_scale` times the base rate at `total_steps`."""
    _check_total(total_steps)

    def scale(step: int) -> float:
        if warmup_steps > 0 and step < warmup_steps:
            return (step + 1) / warmup_steps
        t = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
        return final_scale + (1 - final_scale) * 0.5 * (1 + math.cos(math.pi * t))

    return LambdaLR(optimizer, scale)
