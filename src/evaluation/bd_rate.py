"""Bjøntegaard deltas between two rate-distortion curves.

BD-rate: log10(rate) is interpolated as a function of quality for each curve, both are
integrated over the quality interval they share, and the mean gap d gives (10^d − 1)·100 %:
negative means the test curve needs fewer bits. PCHIP is the default (JVET/JCT-VC common test
conditions), Akima and the original cubic fit (VCEG-M33) are options. The shared interval is
returned with the number, because BD values mean little over a small overlap.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from scipy.interpolate import Akima1DInterpolator, PchipInterpolator

METHODS = ("pchip", "akima", "cubic")


@dataclass
class BDResult:
    """A Bjøntegaard delta with the shared interval it was integrated over."""

    value: float
    overlap: tuple[float, float]
    overlap_fraction: float


def _integral(x: np.ndarray, y: np.ndarray, lo: float, hi: float, method: str) -> float:
    """Integral over [lo, hi] of the curve through (x, y), x increasing."""
    if method == "cubic" and len(x) >= 4:
        poly = np.polyint(np.polyfit(x, y, 3))
        return float(np.polyval(poly, hi) - np.polyval(poly, lo))
    if len(x) < 3 or method == "pchip" or method == "cubic":
        return float(PchipInterpolator(x, y).integrate(lo, hi))
    return float(Akima1DInterpolator(x, y).integrate(lo, hi))


def _sorted_unique(x: Sequence[float], y: Sequence[float]) -> tuple[np.ndarray, np.ndarray]:
    x, y = np.asarray(x, dtype=float), np.asarray(y, dtype=float)
    order = np.argsort(x)
    x, y = x[order], y[order]
    keep = np.concatenate([[True], np.diff(x) > 0])
    return x[keep], y[keep]


def _delta(ax, ay, tx, ty, method: str) -> tuple[float, tuple[float, float], float]:
    if method not in METHODS:
        raise ValueError(f"BD interpolation must be one of {METHODS}, got {method!r}")
    ax, ay = _sorted_unique(ax, ay)
    tx, ty = _sorted_unique(tx, ty)
    if len(ax) < 2 or len(tx) < 2:
        raise ValueError("each curve needs at least two distinct points")
    lo, hi = max(ax[0], tx[0]), min(ax[-1], tx[-1])
    if hi <= lo:
        return float("nan"), (float(lo), float(hi)), 0.0
    union = max(ax[-1], tx[-1]) - min(ax[0], tx[0])
    gap = (_integral(tx, ty, lo, hi, method) - _integral(ax, ay, lo, hi, method)) / (hi - lo)
    return gap, (float(lo), float(hi)), float((hi - lo) / union)


def bd_rate(
    anchor_rate: Sequence[float],
    anchor_quality: Sequence[float],
    test_rate: Sequence[float],
    test_quality: Sequence[float],
    method: str = "pchip",
) -> BDResult:
    """Average bit-rate difference (%) of the test curve against the anchor at equal quality."""
    gap, overlap, fraction = _delta(
        anchor_quality, np.log10(anchor_rate), test_quality, np.log10(test_rate), method
    )
    return BDResult((10**gap - 1) * 100, overlap, fraction)


def bd_quality(
    anchor_rate: Sequence[float],
    anchor_quality: Sequence[float],
    test_rate: Sequence[float],
    test_quality: Sequence[float],
    method: str = "pchip",
) -> BDResult:
    """Average quality difference (e.g. BD-PSNR in dB) of the test curve at equal rate."""
    gap, overlap, fraction = _delta(
        np.log10(anchor_rate), anchor_quality, np.log10(test_rate), test_quality, method
    )
    return BDResult(gap, (10 ** overlap[0], 10 ** overlap[1]), fraction)
