"""Evaluate codecs by really coding images: real bpp, PSNR, MS-SSIM, time, and JPEG at equal rate.

For each image the codec writes a complete file (container header included) and decodes it. Two
counts of each are kept, and `Counting` picks the one that curves, BD-rates and JPEG comparisons
use: bpp over the original pixel count from the whole file (`bpp_file`, the default: what a user
stores) or from the entropy-coded streams alone (`bpp_streams`, as CompressAI's evaluation and
the papers count); PSNR and MS-SSIM on the 8-bit image (`psnr_8bit`, the default: the PNG one
writes) or on the decoder's float output in [0, 1] (`psnr_float`, as CompressAI 1.1's published
curves and QVRF count). JPEG (Pillow, 4:2:0) is coded on the same image over a quality ladder and
read at the codec's rate, so each image yields "dB above JPEG at equal bpp" and "bits saved
against JPEG at equal PSNR".
"""

from __future__ import annotations

import csv
import json
import logging
import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from src.codecs.base import Codec, tile_regions
from src.coding.container import MAX_PIXELS, Rate, unpack, unpack_tile
from src.errors import ConfigError
from src.evaluation.baselines import BaselinePoint, quality_at_rate, rate_at_quality
from src.evaluation.metrics import mean_colour_shift, ms_ssim, psnr, quantize_8bit

log = logging.getLogger(__name__)


BPP_COUNTS = ("file", "streams")
PSNR_ON = ("8bit", "float")


@dataclass(frozen=True)
class Counting:
    """How bpp and quality are counted: `bpp` "file" | "streams", `psnr` "8bit" | "float"
    (PSNR and MS-SSIM alike). The defaults are the whole file and the 8-bit image."""

    bpp: str = "file"
    psnr: str = "8bit"

    def __post_init__(self) -> None:
        if self.bpp not in BPP_COUNTS:
            raise ConfigError(f"bpp={self.bpp}: choose {' or '.join(BPP_COUNTS)}")
        if self.psnr not in PSNR_ON:
            raise ConfigError(f"psnr={self.psnr}: choose {' or '.join(PSNR_ON)}")

    def describe(self) -> str:
        """The counting in words, for result files."""
        bpp = "whole file, header included" if self.bpp == "file" else "entropy-coded streams"
        return f"bpp: {bpp}; PSNR and MS-SSIM: {self.psnr} reconstruction"


def stream_bytes(data: bytes) -> int:
    """The entropy-coded bytes of a file: its streams without the container's header, lengths
    and CRC (tile records likewise)."""
    container = unpack(data)
    if not container.tile:
        return sum(len(s) for s in container.streams)
    return sum(len(s) for record in container.streams for s in unpack_tile(record)[1])


@dataclass
class ImageResult:
    """One image through one codec; `bpp`, `psnr` and `ms_ssim` as `counting` says, both counts
    of bpp and PSNR under their own names."""

    image: str
    bpp: float
    estimated_bpp: float
    psnr: float
    ms_ssim: float
    bpp_file: float
    bpp_streams: float
    psnr_8bit: float
    psnr_float: float
    encoding_time: float
    decoding_time: float
    matches_forward: bool
    jpeg_psnr_at_bpp: float
    jpeg_bpp_at_psnr: float
    colour_shift: float
    extra: dict[str, float] = field(default_factory=dict)

    def row(self) -> dict[str, object]:
        """The CSV row: every field, with the codec's own figures as extra columns."""
        row = asdict(self)
        row.update(row.pop("extra"))
        return row


@torch.no_grad()
def evaluate_image(
    codec: Codec,
    x: Tensor,
    name: str,
    jpeg: list[BaselinePoint] | None,
    rate: Rate | None = None,
    tile: int | None = None,
    perceptual: Callable[[Tensor, Tensor], dict[str, float]] | None = None,
    counting: Counting = Counting(),
    on_decoded: Callable[[Tensor], None] | None = None,
    max_pixels: int = MAX_PIXELS,
) -> ImageResult:
    """Code one (1, 3, H, W) image (at `rate` for a variable-rate codec; tile by tile above
    `tile`), count it as `counting` says and measure it against its JPEG curve at the same rate;
    `perceptual(x, x_hat)` adds figures such as LPIPS (on the 8-bit image); `on_decoded(x_hat)`
    sees the decoded 8-bit image (the report keeps crops). Decoding refuses files of more than
    `max_pixels` pixels."""
    h, w = x.shape[-2:]
    regions = tile_regions((h, w), tile)
    start = time.perf_counter()
    if len(regions) == 1:
        encoded = codec.compress(x, rate)
        data = codec.pack(encoded)
    else:
        encoded, data = None, codec.compress_to_bytes(x, rate, tile=tile)
    encoding_time = time.perf_counter() - start
    start = time.perf_counter()
    x_float = codec.decompress_bytes(data, max_pixels=max_pixels)
    x_hat = quantize_8bit(x_float)
    decoding_time = time.perf_counter() - start
    if on_decoded is not None:
        on_decoded(x_hat)

    # The decoder must rebuild exactly what the model's own quantised forward pass shows; the
    # forward pass runs on the same tiles, so memory stays bounded for huge images too.
    estimated_bits, matches = 0.0, True
    for rows, cols in regions:
        estimate = codec(x[..., rows, cols])
        estimated_bits += float(estimate.total_bits().sum())
        gap = quantize_8bit(estimate.x_hat) - x_hat[..., rows, cols]
        matches = matches and bool(gap.abs().max() <= 1.5 / 255)
    bpp_file = 8 * len(data) / (h * w)  # the whole file, header included
    bpp_streams = 8 * stream_bytes(data) / (h * w)
    bpp = bpp_file if counting.bpp == "file" else bpp_streams
    psnr_8bit, psnr_float = float(psnr(x, x_hat)), float(psnr(x, x_float))
    value = psnr_8bit if counting.psnr == "8bit" else psnr_float
    measured = x_hat if counting.psnr == "8bit" else x_float
    nan = float("nan")
    extra = codec.coding_report(x, encoded) if encoded is not None else {}
    if perceptual is not None:
        extra.update(perceptual(x, x_hat))
    return ImageResult(
        image=name,
        bpp=bpp,
        estimated_bpp=estimated_bits / (h * w),
        psnr=value,
        ms_ssim=float(ms_ssim(x, measured)),
        bpp_file=bpp_file,
        bpp_streams=bpp_streams,
        psnr_8bit=psnr_8bit,
        psnr_float=psnr_float,
        encoding_time=encoding_time,
        decoding_time=decoding_time,
        matches_forward=matches,
        jpeg_psnr_at_bpp=quality_at_rate(jpeg, bpp) if jpeg else nan,
        jpeg_bpp_at_psnr=rate_at_quality(jpeg, value) if jpeg else nan,
        colour_shift=float(mean_colour_shift(x, x_hat)),
        extra=extra,
    )


def _finite(values: list[float]) -> list[float]:
    return [v for v in values if not math.isnan(v)]


def mean(values: list[float]) -> float:
    """The mean of the values that are not NaN (NaN when none is): MS-SSIM is undefined on
    small images, baseline comparisons outside the baseline's range."""
    finite = _finite(values)
    return float(np.mean(finite)) if finite else float("nan")


def worst(values: list[float], pick: Callable[[list[float]], float]) -> float:
    """`pick` (min or max) of the values that are not NaN (NaN when none is)."""
    finite = _finite(values)
    return float(pick(finite)) if finite else float("nan")


def summarize(results: list[ImageResult], counting: Counting = Counting()) -> dict[str, object]:
    """Means over images, plus the comparison with JPEG and how bpp and PSNR were counted."""

    summary: dict[str, object] = {
        "images": len(results),
        "bpp_counts": counting.bpp,
        "psnr_on": counting.psnr,
        "bpp": mean([r.bpp for r in results]),
        "estimated_bpp": mean([r.estimated_bpp for r in results]),
        "psnr": mean([r.psnr for r in results]),
        "ms_ssim": mean([r.ms_ssim for r in results]),
        "bpp_file": mean([r.bpp_file for r in results]),
        "bpp_streams": mean([r.bpp_streams for r in results]),
        "psnr_8bit": mean([r.psnr_8bit for r in results]),
        "psnr_float": mean([r.psnr_float for r in results]),
        "encoding_time": mean([r.encoding_time for r in results]),
        "decoding_time": mean([r.decoding_time for r in results]),
        "all_match_forward": all(r.matches_forward for r in results),
        "delta_psnr_vs_jpeg_db": mean([r.psnr - r.jpeg_psnr_at_bpp for r in results]),
        "rate_vs_jpeg_percent": mean([100 * (r.bpp / r.jpeg_bpp_at_psnr - 1) for r in results]),
        # The worst image: a codec can be good on average and fail on the photo a user has.
        "worst_delta_psnr_vs_jpeg_db": worst([r.psnr - r.jpeg_psnr_at_bpp for r in results], min),
        "worst_colour_shift": worst([r.colour_shift for r in results], max),
    }
    summary["real_over_estimated"] = summary["bpp"] / summary["estimated_bpp"]
    for key in dict.fromkeys(k for r in results for k in r.extra):
        summary[key] = mean([r.extra[key] for r in results if key in r.extra])
    return summary


def write_results(
    results: list[ImageResult],
    summary: dict,
    name: str,
    out_dir: Path,
    counting: Counting = Counting(),
) -> None:
    """Per-image CSV and a summary JSON in CompressAI's results layout (one rate point), saying
    how bpp and PSNR were counted."""
    out_dir.mkdir(parents=True, exist_ok=True)
    with open(out_dir / f"{name}.csv", "w", newline="") as f:
        fields = list(dict.fromkeys(k for r in results for k in r.row()))
        writer = csv.DictWriter(f, fieldnames=fields, restval="")
        writer.writeheader()
        writer.writerows(r.row() for r in results)
    payload = {
        "name": name,
        "description": f"real entropy coding; {counting.describe()}; means over images",
        "counting": asdict(counting),
        "results": {
            "bpp": [summary["bpp"]],
            "psnr-rgb": [summary["psnr"]],
            "ms-ssim-rgb": [summary["ms_ssim"]],
            "encoding_time": [summary["encoding_time"]],
            "decoding_time": [summary["decoding_time"]],
        },
        "summary": summary,
    }
    (out_dir / f"{name}.json").write_text(json.dumps(payload, indent=2))
