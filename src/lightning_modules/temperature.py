"""Gumbel-softmax temperature schedules: T as a function of training progress.

A schedule is a pure function of the position in its `unit` ("epoch", fractional within an
epoch, or "step"), so a resumed run picks up exactly where it stopped. McQuic's pre-release recipe
is `Cosine(1.0, 0.1, length=2000)`: T(e) = 0.1 + 0.9 · (1 + cos(π e / 2000)) / 2; its released
recipe holds T = 1.
"""

from __future__ import annotations

import math

from src.errors import ConfigError

UNITS = ("epoch", "step")


class TemperatureSchedule:
    """Base class: `schedule(position)` is the temperature at `position` (in `unit`)."""

    unit: str = "step"

    def __call__(self, position: float) -> float:
        raise NotImplementedError


class _Annealed(TemperatureSchedule):
    """From `start` to `end` over `length` units, then held at `end`."""

    def __init__(self, start: float, end: float, length: float, unit: str = "epoch") -> None:
        if unit not in UNITS:
            raise ConfigError(f"temperature unit must be one of {UNITS}, got {unit!r}")
        if not (start > 0 and end > 0):
            raise ConfigError(f"temperatures must be positive, got start={start}, end={end}")
        if not length > 0:
            raise ConfigError(f"temperature schedule length must be positive, got {length}")
        self.start, self.end, self.length, self.unit = float(start), float(end), length, unit

    def progress(self, position: float) -> float:
        return min(max(position / self.length, 0.0), 1.0)


class Constant(TemperatureSchedule):
    """T held at `value` (McQuic's released recipe: 1)."""

    def __init__(self, value: float = 1.0) -> None:
        if not value > 0:
            raise ConfigError(f"temperature must be positive, got {value}")
        self.value = float(value)

    def __call__(self, position: float) -> float:
        return self.value


class Exponential(_Annealed):
    """Geometric decay: T = start · (end / start)^(position / length)."""

    def __call__(self, position: float) -> float:
        return self.start * (self.end / self.start) ** self.progress(position)


class Cosine(_Annealed):
    """Half-cosine: T = end + (start − end) · (1 + cos(π · position / length)) / 2."""

    def __call__(self, position: float) -> float:
        return (
            self.end
            + (self.start - self.end) * (1 + math.cos(math.pi * self.progress(position))) / 2
        )


SCHEDULES = {"constant": Constant, "exponential": Exponential, "cosine": Cosine}


def temperature_schedule(
    kind: str = "constant",
    start: float = 1.0,
    end: float = 0.1,
    length: float = 2000,
    unit: str = "epoch",
) -> TemperatureSchedule:
    """The schedule a config names: `kind` constant (T = start), exponential or cosine."""
    if kind not in SCHEDULES:
        raise ConfigError(f"model.temperature.kind must be one of {tuple(SCHEDULES)}, got {kind!r}")
    if kind == "constant":
        return Constant(start)
    return SCHEDULES[kind](start, end, length, unit)
