"""The CI share of `benchmarks/fuzz_decoders.py`: 1400 CRC-valid mutations of real files of every
family, decoded by a worker process, so a segfault or a hang fails this test instead of pytest."""

from __future__ import annotations

import pytest

from benchmarks.fuzz_decoders import FAMILIES, run

FILES_PER_FAMILY = 100
MAX_PIXELS = 1 << 14  # garbage claims up to 128 x 128: quick even for autoregressive decoders


@pytest.mark.filterwarnings("ignore::FutureWarning")
def test_mutated_files_never_crash_hang_or_leak_foreign_errors(tmp_path):
    tallies = run(
        sorted(FAMILIES), FILES_PER_FAMILY, 1, timeout=120, photos=tmp_path, max_pixels=MAX_PIXELS
    )
    for name, tally in tallies.items():
        assert tally.files == FILES_PER_FAMILY, name
        assert (tally.crashes, tally.hangs, tally.bugs) == (0, 0, 0), (name, tally.examples[:5])
        assert tally.decoded > 0 and tally.errors > 0, name  # real files decode, damage is refused
        assert tally.peak_kb < 2 * 1024**2, (name, tally.peak_kb)
