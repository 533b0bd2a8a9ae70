"""Progressive decoding curves: the rate and quality after each coded group of a progressive codec.

Each image is coded once; for every k the file is cut to its first k streams (exactly what
`compress --levels k` writes: the header, length table and CRC of the shared container), its rate
is that file's size, and the quality is measured on the image decoded from that file alone (the
later latents take their prior means). The decoded
images are saved coarse to fine as one PNG strip per image, with the original at the right end.
"""

from __future__ import annotations

import csv
import json
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from rich.table import Table
from torch import Tensor

from src.codecs.base import Codec
from src.coding.container import keep_first_streams, unpack
from src.errors import LicError
from src.evaluation.baselines import to_pil
from src.evaluation.evaluate import mean
from src.evaluation.metrics import ms_ssim, psnr, quantize_8bit
from src.evaluation.plot import plot_rd


@dataclass
class ProgressivePoint:
    """One image decoded from its first `levels` groups."""

    image: str
    levels: int
    bpp: float
    psnr: float
    ms_ssim: float


@torch.no_grad()
def progressive_image(codec: Codec, x: Tensor, name: str) -> tuple[list[ProgressivePoint], Tensor]:
    """Code one (1, 3, H, W) image and decode it from 1, 2, ... all groups.

    Returns the points and the strip of decoded images (coarse to fine, then the original).
    """
    if not codec.progressive:
        raise LicError(
            f"{codec.name} is not a progressive codec; evaluate it with progressive=false"
        )
    h, w = x.shape[-2:]
    full = codec.compress_to_bytes(x)
    points, images = [], []
    for k in range(1, len(unpack(full).streams) + 1):
        data = keep_first_streams(full, k)  # the file `compress --levels k` writes
        x_hat = quantize_8bit(codec.decompress_bytes(data))
        points.append(
            ProgressivePoint(
                image=name,
                levels=k,
                bpp=8 * len(data) / (h * w),
                psnr=float(psnr(x, x_hat)),
                ms_ssim=float(ms_ssim(x, x_hat)),
            )
        )
        images.append(x_hat)
    return points, torch.cat([*images, x], dim=-1)


def mean_progressive_curve(points: list[ProgressivePoint]) -> dict[str, list[float]]:
    """Means over images for each k: {"levels", "bpp", "psnr", "ms_ssim"}."""
    levels = sorted({p.levels for p in points})
    curve: dict[str, list[float]] = {"levels": [float(k) for k in levels]}
    for key in ("bpp", "psnr", "ms_ssim"):
        curve[key] = []
        for k in levels:
            curve[key].append(mean([getattr(p, key) for p in points if p.levels == k]))
    return curve


def evaluate_progressive(
    codec: Codec,
    images: list[Tensor],
    names: list[str],
    run_name: str,
    out_dir: Path,
    reference: dict[str, dict[str, list[float]]] | None = None,
) -> dict[str, list[float]]:
    """The progressive RD curve of one codec over `images`: a per-image CSV, a JSON of the mean
    curve, an RD plot (with `reference` curves such as JPEG), and a strip PNG per image."""
    strips_dir = out_dir / f"{run_name}-progressive"
    strips_dir.mkdir(parents=True, exist_ok=True)
    points: list[ProgressivePoint] = []
    for x, name in zip(images, names):
        image_points, strip = progressive_image(codec, x, name)
        points += image_points
        to_pil(strip).save(strips_dir / f"{Path(name).stem}.png")
    with open(out_dir / f"{run_name}-progressive.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(asdict(points[0])))
        writer.writeheader()
        writer.writerows(asdict(p) for p in points)
    curve = mean_progressive_curve(points)
    payload = {
        "name": run_name,
        "description": "progressive decoding: first k coded groups, the rest from the prior",
        "results": curve,
    }
    (out_dir / f"{run_name}-progressive.json").write_text(json.dumps(payload, indent=2))
    curves = {f"{codec.name}, first k groups": curve, **(reference or {})}
    plot_rd(curves, out_dir / f"{run_name}-progressive-rd.png")
    return curve


def progressive_table(title: str, curve: dict[str, list[float]]) -> Table:
    """The mean curve, one row per k."""
    table = Table(title=f"{title}: progressive decoding")
    for column in ("k", "bpp", "PSNR", "MS-SSIM"):
        table.add_column(column)
    for k, bpp, q, s in zip(curve["levels"], curve["bpp"], curve["psnr"], curve["ms_ssim"]):
        table.add_row(f"{int(k)}", f"{bpp:.4f}", f"{q:.2f}", f"{s:.4f}")
    return table
