"""Cosine annealing with linear warm-up and warm restarts, as a resumable `LambdaLR`.

Cycle i lasts `cycle_length · cycle_mult^i` scheduler steps. Within a cycle the rate rises
linearly from the cycle's floor to its peak over `warmup` steps, then follows a half cosine back
to the floor; the peak is `gamma^i` (times the optimiser's configured rate), the floor
`min_scale`, or `min_scale · gamma^i` with `floor_follows_gamma` (McQuic's official
CosineAnnealingWarmupRestarts scales both ends). This is the schedule McQuic steps once per epoch
(first cycle 1000 or 50 epochs, warm-up 2, gamma 0.25 or 0.9, floor 1 % of the peak).
"""

from __future__ import annotations

import math

from torch.optim import Optimizer
from torch.optim.lr_scheduler import LambdaLR

from src.errors import ConfigError


def warmup_cosine_restarts(
    optimizer: Optimizer,
    cycle_length: int,
    warmup: int = 0,
    gamma: float = 1.0,
    min_scale: float = 0.01,
    cycle_mult: float = 1.0,
    floor_follows_gamma: bool = False,
) -> LambdaLR:
    """The multiplier of the base rate at each scheduler step (see the module docstring)."""
    if cycle_length < 1 or not 0 <= warmup < cycle_length:
        raise ConfigError(
            f"cosine restarts need cycle_length ≥ 1 and 0 ≤ warmup < cycle_length, "
            f"got {cycle_length} and {warmup}"
        )
    if cycle_mult < 1 or gamma <= 0 or not 0 <= min_scale <= 1:
        raise ConfigError("cosine restarts need cycle_mult ≥ 1, gamma > 0, 0 ≤ min_scale ≤ 1")

    def locate(step: int) -> tuple[int, int, int]:
        cycle, length = 0, cycle_length
        while step >= length:
            step -= length
            cycle += 1
            length = max(warmup + 1, int(round(cycle_length * cycle_mult**cycle)))
        return cycle, step, length

    def scale(step: int) -> float:
        cycle, position, length = locate(step)
        peak = gamma**cycle
        floor = min_scale * peak if floor_follows_gamma else min_scale
        if position < warmup:
            return floor + (peak - floor) * position / warmup
        t = (position - warmup) / (length - warmup)
        return floor + (peak - floor) * (1 + math.cos(math.pi * t)) / 2

    return LambdaLR(optimizer, scale)
