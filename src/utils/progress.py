"""Progress that works everywhere: Rich bars in a terminal, plain periodic lines elsewhere.

A batch job or `nohup` run has no terminal, and Rich then shows nothing at all; long jobs there
print one line every `interval` seconds instead, with the count, the rate and an ETA.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Iterable, Iterator, Sequence
from typing import TypeVar

from rich.progress import track as rich_track

T = TypeVar("T")
INTERVAL_S = 30.0


def interactive() -> bool:
    """Whether standard output is a terminal (Rich can draw there)."""
    return sys.stdout.isatty()


def format_eta(seconds: float) -> str:
    """`1h02m`, `4m05s` or `12s`."""
    seconds = max(0, int(round(seconds)))
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    if hours:
        return f"{hours}h{minutes:02d}m"
    return f"{minutes}m{secs:02d}s" if minutes else f"{secs}s"


class PlainReporter:
    """Prints `description: done/total (pct), rate, ETA` at most every `interval` seconds."""

    def __init__(self, description: str, total: int | None, interval: float = INTERVAL_S) -> None:
        self.description, self.total, self.interval = description, total, interval
        self.start = self.last = time.monotonic()

    def update(self, done: int, extra: str = "", force: bool = False) -> None:
        now = time.monotonic()
        if not force and now - self.last < self.interval:
            return
        self.last = now
        elapsed = now - self.start
        parts = [f"{self.description}: {done}" + (f"/{self.total}" if self.total else "")]
        if self.total:
            parts[0] += f" ({100 * done / self.total:.0f} %)"
        if done and elapsed > 0:
            parts.append(f"{done / elapsed:.3g}/s")
            if self.total:
                parts.append(f"ETA {format_eta(elapsed / done * (self.total - done))}")
        parts.append(f"elapsed {format_eta(elapsed)}")
        if extra:
            parts.append(extra)
        print(", ".join(parts), flush=True)


def track(
    sequence: Sequence[T] | Iterable[T],
    description: str,
    total: int | None = None,
    interval: float = INTERVAL_S,
) -> Iterator[T]:
    """Iterate `sequence`, showing progress: a Rich bar in a terminal, else plain lines."""
    if interactive():
        yield from rich_track(sequence, description=description, total=total, transient=True)
        return
    if total is None and hasattr(sequence, "__len__"):
        total = len(sequence)  # type: ignore[arg-type]
    reporter = PlainReporter(description, total, interval)
    done = 0
    for item in sequence:
        yield item
        done += 1
        reporter.update(done)
    reporter.update(done, force=True)
