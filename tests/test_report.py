"""report.html: self-contained, with curves, BD tables and matched-bpp crops; renders in Chromium."""

from __future__ import annotations

import re
import shutil
import subprocess

import pytest
import torch

from src.evaluation.baselines import BaselinePoint, classical_codec
from src.evaluation.plot import plot_rd
from src.evaluation.report import Panel, classical_panel, learned_panels, nearest, write_report


def smooth_image() -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    return torch.nn.functional.interpolate(
        torch.rand(1, 3, 12, 16, generator=g), size=(96, 128), mode="bilinear"
    )


@pytest.fixture()
def report(tmp_path):
    x = smooth_image()
    curves = {"ours": {"bpp": [0.2, 0.5], "psnr": [28.0, 31.0], "ms_ssim": [0.9, 0.95]}}
    plot = plot_rd(curves, tmp_path / "rd.png")
    learned = learned_panels(
        {
            "ours": [Panel("ours-a", x, 0.5, 31.0), Panel("ours-b", x, 0.2, 28.0)],
            "theirs": [Panel("theirs-a", x, 0.21, 27.0), Panel("theirs-b", x, 0.6, 32.0)],
        }
    )
    jpeg = classical_codec("jpeg", [5, 50, 90])
    panels = [Panel("original", x), *learned]
    panels.append(classical_panel(jpeg, x, jpeg.curve(x), learned[0].bpp))
    rows = [{"curve": "ours", "anchor": "jpeg", "psnr": {"value": -12.5}, "ms_ssim": None}]
    return write_report(tmp_path / "report.html", "test <run>", plot, rows, [("img.png", panels)])


def test_report_is_one_self_contained_page(report):
    page = report.read_text()
    assert page.count("<img") == 1 + 4  # the RD plot, then original + 2 learned + JPEG
    assert (
        page.count("src='data:image/png;base64,") + page.count('src="data:image/png;base64,') == 5
    )
    assert 'src="http' not in page and "src='http" not in page  # nothing fetched from elsewhere
    assert "-12.50 %" in page and "test &lt;run&gt;" in page
    captions = re.findall(r"<figcaption>(.*?)</figcaption>", page)
    assert captions[0] == "original" and "bpp" in captions[1] and "dB" in captions[-1]


def test_crops_are_matched_at_the_nearest_bpp():
    x = smooth_image()
    chosen = learned_panels(
        {
            "a": [Panel("a1", x, 0.1, 0), Panel("a2", x, 0.3, 0), Panel("a3", x, 0.9, 0)],
            "b": [Panel("b1", x, 0.25, 0), Panel("b2", x, 0.5, 0)],
        }
    )
    assert [p.label for p in chosen] == ["a2", "b1"]  # a at its median rate, b nearest to it
    ladder = [BaselinePoint(q, b, 0, 0) for q, b in ((5, 0.1), (20, 0.28), (60, 0.8))]
    assert nearest(ladder, 0.3).quality == 20


@pytest.mark.skipif(not shutil.which("chromium"), reason="headless Chromium is not installed")
def test_report_renders_its_images_in_headless_chromium(report, tmp_path):
    proc = subprocess.run(
        [
            "chromium",
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--virtual-time-budget=5000",
            f"--user-data-dir={tmp_path / 'profile'}",
            "--dump-dom",
            report.as_uri(),
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert 'data-images-rendered="5"' in proc.stdout, proc.stderr[-2000:]
