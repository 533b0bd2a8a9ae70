"""The rate-distortion objective: bits per pixel plus λ times a distortion.

MSE follows CompressAI's convention, D = 255² · MSE, so its λ ladder (0.0018 … 0.18) carries over;
MS-SSIM uses D = 1 − MS-SSIM with the ladder 2.40 … 220.
"""

from __future__ import annotations

from dataclasses import dataclass

from pytorch_msssim import ms_ssim
from torch import Tensor

from src.codecs.base import CodecOutput
from src.errors import ConfigError
from src.evaluation.metrics import MS_SSIM_MIN_SIDE

METRICS = ("mse", "ms-ssim")

# CompressAI's zoo ladders, quality 1..8 (docs/source/zoo.rst).
LMBDA_LADDER = {
    "mse": (0.0018, 0.0035, 0.0067, 0.0130, 0.0250, 0.0483, 0.0932, 0.1800),
    "ms-ssim": (2.40, 4.58, 8.73, 16.64, 31.73, 60.50, 115.37, 220.0),
}


def lmbda_for(metric: str, quality: int) -> float:
    """CompressAI's λ for a metric and a quality level 1..8."""
    if metric not in LMBDA_LADDER:
        raise ConfigError(f"model.metric must be one of {METRICS}, got {metric!r}")
    ladder = LMBDA_LADDER[metric]
    if not 1 <= int(quality) <= len(ladder):
        raise ConfigError(f"model.quality must be in 1..{len(ladder)}, got {quality}")
    return ladder[int(quality) - 1]


def ms_ssim_distortion(x: Tensor, x_hat: Tensor) -> Tensor:
    """1 − MS-SSIM of a batch (images in [0, 1], computed in fp32), refusing crops too small
    for its five scales with the setting to change."""
    if min(x.shape[-2:]) < MS_SSIM_MIN_SIDE:
        raise ConfigError(
            f"model.metric=ms-ssim needs crops of at least {MS_SSIM_MIN_SIDE} px, "
            f"got {tuple(x.shape[-2:])}: raise data.crop"
        )
    return 1 - ms_ssim(x.float(), x_hat.float(), data_range=1.0)


@dataclass
class RDTerms:
    """The parts of the loss, each a scalar averaged over the batch."""

    loss: Tensor
    bpp: Tensor
    distortion: Tensor
    mse: Tensor


class RateDistortionLoss:
    """bpp + λ·D for a batch of images and a codec's output."""

    def __init__(self, lmbda: float, metric: str = "mse") -> None:
        if metric not in METRICS:
            raise ConfigError(f"model.metric must be one of {METRICS}, got {metric!r}")
        if lmbda <= 0:
            raise ConfigError(f"model.lmbda must be positive, got {lmbda}")
        self.lmbda = float(lmbda)
        self.metric = metric

    def __call__(self, x: Tensor, out: CodecOutput) -> RDTerms:
        num_pixels = x.shape[0] * x.shape[-2] * x.shape[-1]
        bpp = out.total_bits().sum() / num_pixels
        mse = (x - out.x_hat).pow(2).mean()
        distortion = 255**2 * mse if self.metric == "mse" else ms_ssim_distortion(x, out.x_hat)
        return RDTerms(loss=bpp + self.lmbda * distortion, bpp=bpp, distortion=distortion, mse=mse)
