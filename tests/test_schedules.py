"""Learning-rate schedules follow the run's progress: its steps, or its time budget when that
runs out first (a fake clock stands in for a slow machine)."""

from __future__ import annotations

import io
from datetime import timedelta

import pytest
import torch

from src.errors import ConfigError
from src.lightning_modules.schedules import duration_seconds, step_decay, warmup_cosine


class FakeClock:
    """A clock the test moves on by `per_step` seconds for every training step."""

    def __init__(self, per_step: float) -> None:
        self.now = 0.0
        self.per_step = per_step

    def __call__(self) -> float:
        return self.now


def _optimizer() -> torch.optim.Optimizer:
    return torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)


def _run(schedule, optimizer, clock: FakeClock, steps: int) -> list[float]:
    """The learning rate after each of `steps` training steps."""
    rates = []
    for _ in range(steps):
        optimizer.step()
        clock.now += clock.per_step
        schedule.step()
        rates.append(optimizer.param_groups[0]["lr"])
    return rates


def _roundtrip(state: dict) -> io.BytesIO:
    buffer = io.BytesIO()
    torch.save(state, buffer)
    buffer.seek(0)
    return buffer


def _cuts(rates: list[float]) -> list[int]:
    """Steps (1-based) after which the rate dropped."""
    return [i + 1 for i in range(1, len(rates)) if rates[i] < rates[i - 1] - 1e-12]


def test_duration_seconds_reads_lightning_max_time_forms():
    assert duration_seconds("00:00:15:00") == 900
    assert duration_seconds("01:02:03:04") == 93784
    assert duration_seconds({"minutes": 2, "seconds": 5}) == 125
    assert duration_seconds(timedelta(minutes=3)) == 180
    assert duration_seconds(None) is None
    with pytest.raises(ConfigError, match="DD:HH:MM:SS"):
        duration_seconds("15 minutes")


def test_step_decay_cuts_at_fractions_of_the_steps_on_a_fast_machine():
    clock, opt = FakeClock(per_step=0.01), _optimizer()  # 1000 steps take 10 s of 900
    schedule = step_decay(opt, 1000, [0.75, 0.92], 0.2, max_time="00:00:15:00", clock=clock)
    rates = _run(schedule, opt, clock, 1000)
    assert _cuts(rates) == [750, 920]
    assert rates[-1] == pytest.approx(0.04)


def test_step_decay_cuts_at_fractions_of_the_time_when_time_runs_out_first():
    # A slow machine: 1 s a step, so the 900 s budget ends at step 900 of the planned 4500.
    clock, opt = FakeClock(per_step=1.0), _optimizer()
    schedule = step_decay(opt, 4500, [0.75, 0.92], 0.2, max_time="00:00:15:00", clock=clock)
    rates = _run(schedule, opt, clock, 900)
    # The first step() starts the clock: step k has spent (k - 1) s.
    assert _cuts(rates) == [676, 829]
    assert rates[-1] == pytest.approx(0.04)
    assert schedule.progress() == pytest.approx(899 / 900)


def test_without_max_time_the_schedule_is_keyed_to_steps_alone():
    clock, opt = FakeClock(per_step=100.0), _optimizer()
    schedule = step_decay(opt, 100, [0.5], 0.1, clock=clock)
    assert _cuts(_run(schedule, opt, clock, 100)) == [50]


def test_spent_time_survives_a_resume_and_a_new_clock():
    clock, opt = FakeClock(per_step=1.0), _optimizer()
    schedule = step_decay(opt, 4500, [0.75, 0.92], 0.2, max_time="00:00:15:00", clock=clock)
    _run(schedule, opt, clock, 600)
    state = schedule.state_dict()
    # Plain values only, as checkpoints are loaded with weights_only=True.
    saved = torch.load(_roundtrip(state), weights_only=True)

    later = FakeClock(per_step=1.0)
    later.now = 10_000.0  # another process: its clock starts anywhere
    opt2 = _optimizer()
    resumed = step_decay(opt2, 4500, [0.75, 0.92], 0.2, max_time="00:00:15:00", clock=later)
    resumed.load_state_dict(saved)
    assert resumed.elapsed == pytest.approx(599.0)
    rates = _run(resumed, opt2, later, 300)
    # 675 s is reached 76 steps after the resume (its first step adds no time).
    assert _cuts(rates) == [77, 230]


def test_cosine_reaches_its_floor_when_the_time_runs_out():
    clock, opt = FakeClock(per_step=1.0), _optimizer()
    schedule = warmup_cosine(opt, 4500, 10, 0.01, max_time="00:00:05:00", clock=clock)
    rates = _run(schedule, opt, clock, 301)
    assert rates[4] == pytest.approx(0.6)  # warm-up over steps
    assert rates[150] == pytest.approx(0.505, abs=0.02)  # half the time: half way down
    assert rates[-1] == pytest.approx(0.01)


def test_bad_lengths_are_config_errors():
    with pytest.raises(ConfigError, match="max_steps"):
        step_decay(_optimizer(), 0)
    with pytest.raises(ConfigError, match="positive"):
        step_decay(_optimizer(), 10, max_time="00:00:00:00")
