"""Batch augmentations on the training device, as McQuic's official trainer applies them.

Images are (B, 3, H, W) in [0, 1]; every random choice is made per image from torch's generator,
so a seeded run repeats them. `Augment` is gamma, then Planckian jitter, then horizontal and
vertical flips; `PatchErasing` blanks a share of a patch grid of the codec's input (the loss is
taken against the image before erasing).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from src.errors import ConfigError

# Black-body (r, g, b) chromaticities of Kornia's Planckian jitter (`mode="blackbody"`), which
# McQuic's official code carries too; the jitter scales red by r/g and blue by b/g.
PLANCKIAN_RGB = (
    (0.6743, 0.4029, 0.0013), (0.6281, 0.4241, 0.1665), (0.5919, 0.4372, 0.2513),
    (0.5623, 0.4457, 0.3154), (0.5376, 0.4515, 0.3672), (0.5163, 0.4555, 0.4103),
    (0.4979, 0.4584, 0.4468), (0.4816, 0.4604, 0.4782), (0.4672, 0.4619, 0.5053),
    (0.4542, 0.4630, 0.5289), (0.4426, 0.4638, 0.5497), (0.4320, 0.4644, 0.5681),
    (0.4223, 0.4648, 0.5844), (0.4135, 0.4651, 0.5990), (0.4054, 0.4653, 0.6121),
    (0.3980, 0.4654, 0.6239), (0.3911, 0.4655, 0.6346), (0.3847, 0.4656, 0.6444),
    (0.3787, 0.4656, 0.6532), (0.3732, 0.4656, 0.6613), (0.3680, 0.4655, 0.6688),
    (0.3632, 0.4655, 0.6756), (0.3586, 0.4655, 0.6820), (0.3544, 0.4654, 0.6878),
    (0.3503, 0.4653, 0.6933), (0.5829, 0.4421, 0.2288), (0.5510, 0.4514, 0.2948),
    (0.5246, 0.4576, 0.3488), (0.5021, 0.4618, 0.3941), (0.4826, 0.4646, 0.4325),
    (0.4654, 0.4667, 0.4654), (0.4502, 0.4681, 0.4938), (0.4364, 0.4692, 0.5186),
    (0.4240, 0.4700, 0.5403), (0.4127, 0.4705, 0.5594), (0.4023, 0.4709, 0.5763),
    (0.3928, 0.4713, 0.5914), (0.3839, 0.4715, 0.6049), (0.3757, 0.4716, 0.6171),
    (0.3681, 0.4717, 0.6281), (0.3609, 0.4718, 0.6380), (0.3543, 0.4719, 0.6472),
    (0.3480, 0.4719, 0.6555), (0.3421, 0.4719, 0.6631), (0.3365, 0.4719, 0.6702),
    (0.3313, 0.4719, 0.6766), (0.3263, 0.4719, 0.6826), (0.3217, 0.4719, 0.6882),
)  # fmt: skip


def _probability(name: str, p: float) -> float:
    if not 0 <= p <= 1:
        raise ConfigError(f"model.augment.{name} is a probability in [0, 1], got {p}")
    return float(p)


def random_gamma(x: Tensor) -> Tensor:
    """Per image, one of four tone curves with equal chance, as the official `RandomGamma`:
    the sRGB encoding curve, its inverse, x^γ with γ ~ U(0.05, 2), or none."""
    x = x.clamp(0, 1)
    choice = torch.randint(4, (x.shape[0], 1, 1, 1), device=x.device)
    gamma = torch.rand(x.shape[0], 1, 1, 1, device=x.device) * 1.95 + 0.05
    encode = torch.where(x < 0.0031308, 12.92 * x, 1.055 * x.pow(1 / 2.4) - 0.055)
    decode = torch.where(x < 0.04045, x / 12.92, ((x + 0.055) / 1.055).pow(2.4))
    curves = torch.stack([encode, decode, x.pow(gamma), x])  # 4, B, C, H, W
    picked = curves.gather(0, choice[None].expand(1, *x.shape))[0]
    return picked.clamp(0, 1)


def planckian_jitter(x: Tensor, p: float) -> Tensor:
    """With probability p per image, the white balance of a random black-body illuminant."""
    table = torch.tensor(PLANCKIAN_RGB, device=x.device, dtype=x.dtype)
    ratios = torch.stack([table[:, 0] / table[:, 1], table[:, 2] / table[:, 1]], 1)
    pick = ratios[torch.randint(len(ratios), (x.shape[0],), device=x.device)]
    apply = torch.rand(x.shape[0], device=x.device) < p
    scale = torch.ones(x.shape[0], 3, device=x.device, dtype=x.dtype)
    scale[apply, 0], scale[apply, 2] = pick[apply, 0], pick[apply, 1]
    return (x * scale[:, :, None, None]).clamp(0, 1)


def random_flip(x: Tensor, p: float, dim: int) -> Tensor:
    """Flip each image along `dim` (-1 horizontal, -2 vertical) with probability p."""
    flip = (torch.rand(x.shape[0], device=x.device) < p)[:, None, None, None]
    return torch.where(flip, x.flip(dim), x)


class Augment(nn.Module):
    """McQuic's training augmentations, each switchable.

    Args:
        gamma: the official random tone curve (`random_gamma`).
        planckian: probability of a Planckian white-balance jitter. The official trainer asks for
            1.0, but its jitter scales a copy of the batch and so leaves the images unchanged:
            0 reproduces that run, 1.0 what it meant.
        hflip, vflip: probabilities of horizontal and vertical flips (0.5 each officially).
    """

    def __init__(
        self, gamma: bool = True, planckian: float = 0.0, hflip: float = 0.5, vflip: float = 0.5
    ) -> None:
        super().__init__()
        self.gamma = bool(gamma)
        self.planckian = _probability("planckian", planckian)
        self.hflip = _probability("hflip", hflip)
        self.vflip = _probability("vflip", vflip)

    @torch.no_grad()
    def forward(self, x: Tensor) -> Tensor:
        if self.gamma:
            x = random_gamma(x)
        if self.planckian > 0:
            x = planckian_jitter(x, self.planckian)
        x = random_flip(x, self.hflip, -1)
        return random_flip(x, self.vflip, -2)


class PatchErasing(nn.Module):
    """Blank `share` of a `grid` × `grid` patch grid, one random pattern per batch, as the
    official `PatchWiseErasing`: it zeroes the input on McQuic's [−1, 1] scale, i.e. mid-grey
    0.5 here. Patches are the image size over the grid (nearest-neighbour resizing)."""

    def __init__(self, grid: int = 16, share: float = 0.75, fill: float = 0.5) -> None:
        super().__init__()
        if grid < 1 or not 0 <= share <= 1:
            raise ConfigError(
                f"patch erasing needs grid ≥ 1 and share in [0, 1], got {grid}, {share}"
            )
        self.grid, self.share, self.fill = int(grid), float(share), float(fill)

    @torch.no_grad()
    def forward(self, x: Tensor) -> Tensor:
        cells = self.grid * self.grid
        keep = torch.ones(cells, device=x.device, dtype=x.dtype)
        keep[torch.randperm(cells, device=x.device)[: round(cells * self.share)]] = 0
        mask = F.interpolate(keep.view(1, 1, self.grid, self.grid), size=x.shape[-2:])
        return x * mask + self.fill * (1 - mask)
