"""Classical codecs through Pillow, on the same images and metrics as the learned ones."""

from __future__ import annotations

import io
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image
from torch import Tensor

from src.evaluation.metrics import ms_ssim, psnr

DEFAULT_QUALITIES = (1, 2, 3, 5, 8, 10, 15, 20, 25, 30, 40, 50, 60, 70, 80, 90, 95)


@dataclass
class BaselinePoint:
    """One image coded at one quality setting."""

    quality: int
    bpp: float
    psnr: float
    ms_ssim: float


def to_pil(x: Tensor) -> Image.Image:
    """(1, 3, H, W) or (3, H, W) in [0, 1] to an 8-bit RGB image."""
    arr = x.squeeze(0).clamp(0, 1).mul(255).round().byte().permute(1, 2, 0).cpu().numpy()
    return Image.fromarray(arr, "RGB")


def from_pil(img: Image.Image) -> Tensor:
    """An RGB image to (1, 3, H, W) in [0, 1]."""
    arr = np.asarray(img.convert("RGB"), dtype=np.uint8)
    return torch.from_numpy(arr.copy()).permute(2, 0, 1).float().div(255).unsqueeze(0)


def pillow_codec_curve(
    x: Tensor, fmt: str = "JPEG", qualities: tuple[int, ...] = DEFAULT_QUALITIES
) -> list[BaselinePoint]:
    """Code `x` with Pillow's `fmt` (JPEG with 4:2:0, or WEBP) at each quality."""
    img = to_pil(x)
    h, w = img.height, img.width
    points = []
    for q in qualities:
        buf = io.BytesIO()
        img.save(buf, format=fmt, quality=int(q))
        data = buf.getvalue()
        x_hat = from_pil(Image.open(io.BytesIO(data)))
        points.append(
            BaselinePoint(
                quality=int(q),
                bpp=8 * len(data) / (h * w),
                psnr=float(psnr(x, x_hat)),
                ms_ssim=float(ms_ssim(x, x_hat)),
            )
        )
    return points


def quality_at_rate(curve: list[BaselinePoint], bpp: float, metric: str = "psnr") -> float:
    """The baseline's metric at `bpp`, linear in log-rate between its points (NaN outside)."""
    rates = np.log([p.bpp for p in curve])
    values = np.array([getattr(p, metric) for p in curve])
    order = np.argsort(rates)
    rates, values = rates[order], values[order]
    if not rates[0] <= np.log(bpp) <= rates[-1]:
        return float("nan")
    return float(np.interp(np.log(bpp), rates, values))


def rate_at_quality(curve: list[BaselinePoint], value: float, metric: str = "psnr") -> float:
    """The baseline's bpp to reach `value` of `metric`, by the same interpolation (NaN outside)."""
    values = np.array([getattr(p, metric) for p in curve])
    rates = np.log([p.bpp for p in curve])
    order = np.argsort(values)
    values, rates = values[order], rates[order]
    if not values[0] <= value <= values[-1]:
        return float("nan")
    return float(np.exp(np.interp(value, values, rates)))
