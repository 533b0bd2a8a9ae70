"""Progress outside a terminal: periodic plain lines with counts and an ETA, for every long job."""

from __future__ import annotations

from src.lightning_modules.progress import PlainProgressBar, StepRichProgressBar, progress_bar
from src.utils import progress
from src.utils.progress import format_eta, track


def test_track_prints_plain_lines_when_not_a_terminal(capsys, monkeypatch):
    monkeypatch.setattr(progress, "interactive", lambda: False)
    assert list(track(range(5), "coding", interval=0)) == list(range(5))
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith("coding: 1/5 (20 %)") and "ETA" in lines[0]
    assert lines[-1].startswith("coding: 5/5 (100 %)")


def test_track_stays_quiet_between_intervals(capsys, monkeypatch):
    monkeypatch.setattr(progress, "interactive", lambda: False)
    list(track(range(100), "x", interval=3600))
    lines = capsys.readouterr().out.splitlines()  # nothing while the interval runs: the close
    assert len(lines) == 1 and lines[0].startswith("x: 100/100 (100 %)")


def test_eta_format():
    assert (format_eta(12), format_eta(245), format_eta(3720)) == ("12s", "4m05s", "1h02m")


def test_training_bar_follows_the_terminal(monkeypatch):
    monkeypatch.setattr("src.lightning_modules.progress.interactive", lambda: True)
    assert isinstance(progress_bar(), StepRichProgressBar)
    monkeypatch.setattr("src.lightning_modules.progress.interactive", lambda: False)
    assert isinstance(progress_bar(5), PlainProgressBar)
