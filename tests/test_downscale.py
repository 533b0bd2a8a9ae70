"""The TF HiFIC reference's random downscale before the crop (`data.downscale`) and `data.flip`."""

from __future__ import annotations

import random

import pytest
import torch
import torch.nn.functional as F

from src.datamodules.datasets import MemorySource, RandomCropDataset
from src.datamodules.downscale import downscale_factor, random_downscaled_crop
from src.errors import ConfigError


class Images(MemorySource):
    """Images given as tensors."""

    def __init__(self, *images: torch.Tensor) -> None:
        self.images = list(images)
        self.names = [str(i) for i in range(len(images))]


def ramp(h: int, w: int) -> torch.Tensor:
    """A uint8 image rising left to right (so flips and scales show)."""
    row = torch.linspace(0, 255, w).round().to(torch.uint8)
    return row.expand(3, h, w).clone()


def test_factors_follow_the_reference_draw():
    rng = random.Random(0)
    big = [downscale_factor(rng, (800, 1000), 256, 0.75, 0.95) for _ in range(2000)]
    assert 0.75 <= min(big) < 0.76 and 0.94 < max(big) <= 0.95
    # A shorter side of 300: no factor below 256/300, so the crop still fits.
    mid = [downscale_factor(rng, (300, 1000), 256, 0.75, 0.95) for _ in range(200)]
    assert min(mid) >= 256 / 300
    # Smaller than the crop: scaled up so the shorter side is the crop, never padded.
    assert downscale_factor(rng, (200, 300), 256, 0.75, 0.95) == pytest.approx(256 / 200)


def test_a_downscaled_crop_is_a_resized_region_of_the_image():
    img = ramp(600, 900)
    crop = random_downscaled_crop(img, 256, (0.75, 0.95), random.Random(1))
    assert crop.shape == (3, 256, 256) and crop.dtype == torch.float32
    # The ramp's slope grows by 1/factor: a 256 crop spans 270–341 source columns.
    step = 255 / 899
    span = float(crop[0, 0, -1] - crop[0, 0, 0]) / step
    assert 270 * 255 / 256 <= span <= 342
    # Small images are upscaled as a whole shorter side, not reflect-padded.
    small = ramp(200, 300)
    up = random_downscaled_crop(small, 256, (0.75, 0.95), random.Random(2))
    assert float(up[0, 0, -1] - up[0, 0, 0]) == pytest.approx(
        float(up[0, 0].max() - up[0, 0].min())
    )
    assert torch.all(up[0, 0, 1:] >= up[0, 0, :-1])  # monotone: no mirrored border
    region = small[None, :, :, :200].float()
    assert (up - F.interpolate(region, size=(256, 256), mode="bilinear")[0]).abs().amax() < 256


def test_the_dataset_option_and_its_checks():
    source = Images(ramp(400, 600))
    plain = RandomCropDataset(source, [0], 128, repeat=8, flip=False)
    scaled = RandomCropDataset(source, [0], 128, repeat=8, downscale=(0.75, 0.95), flip=False)
    for dataset in (plain, scaled):
        for crop in (dataset[i] for i in range(8)):
            assert crop.shape == (3, 128, 128)
            assert torch.all(crop[0, 0, 1:] >= crop[0, 0, :-1] - 0.01)  # never flipped
    # Native scale: 128 crop columns span 127 source columns; downscaled, more.
    plain_span = float(plain[0][0, 0, -1] - plain[0][0, 0, 0])
    scaled_span = float(scaled[0][0, 0, -1] - scaled[0][0, 0, 0])
    assert scaled_span > plain_span * 1.04
    flips = RandomCropDataset(source, [0], 128, repeat=16)
    assert any(bool(torch.all(c[0, 0, 1:] <= c[0, 0, :-1])) for c in (flips[i] for i in range(16)))
    for bad in ((0.9, 0.8), (0.0, 0.5), (0.8, 1.2)):
        with pytest.raises(ConfigError, match="data.downscale"):
            RandomCropDataset(source, [0], 128, downscale=bad)
