"""`report.html`: one self-contained page of an evaluation, to look at and to share.

It holds the RD curves (the run's `rd.png`), the BD-rate tables, and for a few images side-by-side
crops of the original, each learned codec and each classical codec at the nearest matched bpp,
with bpp and PSNR under each. Every image is embedded as a PNG data URI: the file needs nothing
beside it.
"""

from __future__ import annotations

import base64
import html
import io
import math
from dataclasses import dataclass
from pathlib import Path

from torch import Tensor

from src.evaluation.baselines import BaselinePoint, ClassicalCodec, from_pil, to_pil
from src.evaluation.metrics import psnr

CROP = 256


@dataclass
class Panel:
    """One crop in a comparison row, with what it cost and what it scored (on the whole image)."""

    label: str
    image: Tensor  # (1, 3, h, w) in [0, 1], already cropped
    bpp: float | None = None
    psnr: float | None = None


def centre_crop(x: Tensor, side: int = CROP) -> Tensor:
    """The central `side` × `side` window of (1, 3, H, W) (the whole image where smaller)."""
    h, w = x.shape[-2:]
    top, left = max(0, (h - side) // 2), max(0, (w - side) // 2)
    return x[..., top : top + side, left : left + side]


def nearest(points: list[BaselinePoint], bpp: float) -> BaselinePoint:
    """The point of a classical codec's per-image curve whose bpp is closest to `bpp` (in log)."""
    return min(points, key=lambda p: abs(math.log(p.bpp) - math.log(bpp)))


def classical_panel(
    codec: ClassicalCodec, x: Tensor, points: list[BaselinePoint], bpp: float
) -> Panel:
    """`codec` on image `x` at its ladder quality nearest to `bpp`, coded again for the pixels."""
    point = nearest(points, bpp)
    _, decoded = codec.code(to_pil(x), point.quality)
    x_hat = from_pil(decoded)
    label = f"{codec.name} q{point.quality}"
    return Panel(label, centre_crop(x_hat), point.bpp, float(psnr(x, x_hat)))


def learned_panels(points: dict[str, list[Panel]]) -> list[Panel]:
    """One panel per learned curve for one image, out of each curve's rate points: the first
    curve at its median rate, every other at its point nearest to that bpp."""
    chosen: list[Panel] = []
    for panels in points.values():
        by_rate = sorted(panels, key=lambda p: p.bpp)
        if not chosen:
            chosen.append(by_rate[len(by_rate) // 2])
            continue
        target = math.log(chosen[0].bpp)
        chosen.append(min(by_rate, key=lambda p: abs(math.log(p.bpp) - target)))
    return chosen


def data_uri_png(x: Tensor) -> str:
    """An image tensor as an embeddable PNG data URI."""
    buf = io.BytesIO()
    to_pil(x).save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def _file_uri(path: Path) -> str:
    return "data:image/png;base64," + base64.b64encode(path.read_bytes()).decode()


def _bd_html(rows: list[dict]) -> str:
    if not rows:
        return "<p>No BD-rate: fewer than two curves of two points.</p>"
    cells = []
    for row in rows:
        figures = []
        for metric in ("psnr", "ms_ssim"):
            result = row.get(metric)
            figures.append(f"{result['value']:+.2f} %" if result else "n/a")
        cells.append(
            "<tr>"
            + "".join(
                f"<td>{html.escape(str(v))}</td>" for v in (row["curve"], row["anchor"], *figures)
            )
            + "</tr>"
        )
    head = "<tr><th>curve</th><th>anchor</th><th>BD-rate PSNR</th><th>BD-rate MS-SSIM dB</th></tr>"
    return f"<table>{head}{''.join(cells)}</table>"


def _panel_html(panel: Panel) -> str:
    caption = html.escape(panel.label)
    if panel.bpp is not None:
        caption += f"<br>{panel.bpp:.3f} bpp, {panel.psnr:.2f} dB"
    return (
        f'<figure><img src="{data_uri_png(panel.image)}" alt="{html.escape(panel.label)}">'
        f"<figcaption>{caption}</figcaption></figure>"
    )


STYLE = """
body { font-family: sans-serif; margin: 2em; color: #222; }
table { border-collapse: collapse; margin: 1em 0; }
td, th { border: 1px solid #bbb; padding: 0.3em 0.7em; text-align: right; }
td:first-child, th:first-child { text-align: left; }
.row { display: flex; flex-wrap: wrap; gap: 0.8em; }
figure { margin: 0; text-align: center; font-size: 0.85em; }
figure img { display: block; image-rendering: pixelated; }
img.rd { max-width: 100%; }
"""


# Marks the page with how many of its images decoded (read by the headless-browser test).
COUNT_IMAGES = (
    "window.addEventListener('load', () => { document.body.dataset.imagesRendered = "
    "[...document.images].filter(i => i.complete && i.naturalWidth > 0).length; });"
)


def write_report(
    path: str | Path,
    title: str,
    rd_plot: Path,
    bd_rows: list[dict],
    comparisons: list[tuple[str, list[Panel]]],
) -> Path:
    """Write the page: the RD plot, the BD tables, then one row of crops per compared image."""
    rows = "".join(
        f"<h3>{html.escape(name)}</h3><div class='row'>{''.join(map(_panel_html, panels))}</div>"
        for name, panels in comparisons
    )
    page = (
        "<!DOCTYPE html><html><head><meta charset='utf-8'>"
        f"<title>{html.escape(title)}</title><style>{STYLE}</style></head><body>"
        f"<h1>{html.escape(title)}</h1>"
        f"<h2>Rate-distortion</h2><img class='rd' src='{_file_uri(rd_plot)}' alt='RD curves'>"
        f"<h2>BD-rate</h2>{_bd_html(bd_rows)}"
        "<h2>Side by side</h2><p>Central crops; bpp and PSNR are those of the whole image, each "
        "classical codec at the quality of its ladder nearest to the learned codec's bpp.</p>"
        f"{rows}<script>{COUNT_IMAGES}</script></body></html>"
    )
    path = Path(path)
    path.write_text(page)
    return path
