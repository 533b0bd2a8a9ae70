"""BD-rate against the reference values computed from CompressAI's published Kodak curves."""

from __future__ import annotations

import math

import bjontegaard
import pytest

from src.evaluation.bd_rate import bd_quality, bd_rate

# ../shared/research/anchors-framework.md §A.7 (values rounded to 4 dp bpp, 3 dp PSNR).
BPG444 = (
    [0.0678, 0.1610, 0.3516, 0.6847, 1.1997, 1.9297, 3.0579, 4.7031],
    [26.195, 28.682, 31.595, 34.857, 38.260, 41.479, 44.703, 47.633],
)
CHENG2020_ANCHOR = (
    [0.1196, 0.1838, 0.2710, 0.4174, 0.5945, 0.8057],
    [28.582, 29.969, 31.343, 33.390, 35.119, 36.704],
)
HYPERPRIOR = (
    [0.1313, 0.2089, 0.3199, 0.4784, 0.6687, 0.9388, 1.2592, 1.6602],
    [27.582, 29.197, 30.972, 32.838, 34.526, 36.743, 38.584, 40.557],
)


@pytest.mark.parametrize(
    ("test", "method", "expected"),
    [
        (CHENG2020_ANCHOR, "pchip", -18.89),
        (CHENG2020_ANCHOR, "akima", -18.95),
        (CHENG2020_ANCHOR, "cubic", -18.83),
        (HYPERPRIOR, "pchip", 3.93),
    ],
)
def test_bd_rate_matches_the_reference_values(test, method, expected):
    result = bd_rate(*BPG444, *test, method=method)
    assert result.value == pytest.approx(expected, abs=0.05)
    assert result.overlap == pytest.approx(
        (
            28.582 if test is CHENG2020_ANCHOR else 27.582,
            36.704 if test is CHENG2020_ANCHOR else 40.557,
        )
    )
    assert 0 < result.overlap_fraction < 1


def test_bd_psnr_matches_the_reference_value():
    assert bd_quality(*BPG444, *CHENG2020_ANCHOR).value == pytest.approx(0.913, abs=0.01)


def test_a_curve_against_itself_is_zero_and_disjoint_curves_are_nan():
    assert bd_rate(*BPG444, *BPG444).value == pytest.approx(0.0, abs=1e-9)
    far = ([0.1, 0.2], [50.0, 51.0])
    assert math.isnan(bd_rate(*BPG444, *far).value)


def test_order_of_points_does_not_matter():
    rates, psnrs = CHENG2020_ANCHOR
    shuffled = (rates[::-1], psnrs[::-1])
    assert bd_rate(*BPG444, *shuffled).value == pytest.approx(
        bd_rate(*BPG444, *CHENG2020_ANCHOR).value
    )


@pytest.mark.parametrize("method", ["pchip", "akima"])
@pytest.mark.parametrize("test", [CHENG2020_ANCHOR, HYPERPRIOR], ids=["cheng2020", "hyperprior"])
def test_bd_rate_agrees_with_the_bjontegaard_package(test, method):
    """A cross-check against the `bjontegaard` package (a test dependency only) on CompressAI's
    published Kodak curves."""
    theirs = bjontegaard.bd_rate(*BPG444, *test, method=method, require_matching_points=False)
    assert bd_rate(*BPG444, *test, method=method).value == pytest.approx(theirs, abs=1e-9)
