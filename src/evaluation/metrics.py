"""Per-image quality metrics, computed the way CompressAI's evaluation does.

PSNR and MS-SSIM are computed per image on inputs in [0, 1] and averaged over images by the
caller.
"""

from __future__ import annotations

import torch
from pytorch_msssim import ms_ssim as _ms_ssim
from torch import Tensor

MS_SSIM_MIN_SIDE = 161  # five scales of an 11-pixel window need more than (11 - 1) * 2**4 pixels


def quantize_8bit(x: Tensor) -> Tensor:
    """Round [0, 1] images to the 8-bit grid a PNG on disk would hold."""
    return x.clamp(0, 1).mul(255).round().div(255)


def psnr(x: Tensor, x_hat: Tensor, data_range: float = 1.0) -> Tensor:
    """Per-image PSNR in dB, shape (B,)."""
    mse = (x - x_hat).pow(2).flatten(1).mean(dim=1)
    return 10 * torch.log10(data_range**2 / mse.clamp_min(1e-12))


def ms_ssim(x: Tensor, x_hat: Tensor, data_range: float = 1.0) -> Tensor:
    """Per-image MS-SSIM, shape (B,); NaN where the image is too small for five scales."""
    if min(x.shape[-2:]) < MS_SSIM_MIN_SIDE:
        return torch.full((x.shape[0],), float("nan"), device=x.device)
    return _ms_ssim(x.float(), x_hat.float(), data_range=data_range, size_average=False)


def ms_ssim_db(value: Tensor | float) -> Tensor:
    """MS-SSIM on the decibel scale the RD plots use: -10 log10(1 - MS-SSIM)."""
    return -10 * torch.log10((1 - torch.as_tensor(value, dtype=torch.float64)).clamp_min(1e-12))


def mean_colour_shift(x: Tensor, y: Tensor) -> Tensor:
    """Per-image largest difference of a channel's mean, in 8-bit levels, shape (B,): how far a
    reconstruction's overall colour drifted (a green leaf come back olive shows here)."""
    return (x.mean(dim=(-2, -1)) - y.mean(dim=(-2, -1))).abs().amax(dim=-1) * 255
