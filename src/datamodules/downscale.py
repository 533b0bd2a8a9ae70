"""The TF HiFIC reference's random downscale before the training crop.

Each image is scaled by a factor drawn uniformly from [lo, hi] (0.75–0.95 in the reference, to wash
out JPEG artefacts) before a random crop; an image whose shorter side would then fall below the
crop is instead scaled so that side equals the crop (upscaled if it is smaller than the crop).
Only the region that becomes the crop is resampled: a square of side crop / factor of the
original, resized to the crop with antialiased bilinear filtering (the reference resized the
whole image, bilinear, without antialiasing).
"""

from __future__ import annotations

import random
from collections.abc import Sequence

import torch.nn.functional as F
from torch import Tensor

from src.errors import ConfigError


def check_downscale(factors: Sequence[float] | None) -> tuple[float, float] | None:
    """(lo, hi) as floats, or a ConfigError unless 0 < lo <= hi <= 1."""
    if factors is None:
        return None
    lo, hi = (float(f) for f in factors)
    if not 0 < lo <= hi <= 1:
        raise ConfigError(f"data.downscale={list(factors)} must be [lo, hi] with 0 < lo <= hi <= 1")
    return lo, hi


def downscale_factor(
    rng: random.Random, size: tuple[int, int], crop: int, lo: float, hi: float
) -> float:
    """The reference's draw: uniform in [max(lo, crop/shorter), max(that, hi)]."""
    low = max(lo, crop / min(size))
    return rng.uniform(low, max(low, hi))


def random_downscaled_crop(
    img: Tensor, crop: int, factors: tuple[float, float], rng: random.Random
) -> Tensor:
    """A `crop`² float crop (0–255) of the uint8 (3, H, W) image scaled by a random factor."""
    h, w = img.shape[-2:]
    factor = downscale_factor(rng, (h, w), crop, *factors)
    side = min(h, w, round(crop / factor))  # the original's region that becomes the crop
    top = rng.randint(0, h - side)
    left = rng.randint(0, w - side)
    region = img[None, :, top : top + side, left : left + side].float()
    resized = F.interpolate(region, size=(crop, crop), mode="bilinear", antialias=side > crop)
    return resized[0].clamp_(0, 255)
