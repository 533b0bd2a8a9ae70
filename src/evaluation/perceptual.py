"""Perceptual figures for evaluate.py, as HiFIC reports them: LPIPS per image, FID and KID.

Each needs local weights and nothing is downloaded: `perceptual.lpips_weights` is the directory
with the LPIPS files (`src/losses/perceptual.py`), `perceptual.inception_weights` the InceptionV3
file of torch-fidelity (the network FID/KID are defined on). FID and KID follow HiFIC's protocol:
they compare patches (`patch_size`, 256 in the paper) of the originals and of the decoded images,
cut on a grid and again on the grid shifted by half a patch; an image smaller than a patch gives
none. They are computed by torchmetrics over all images of one rate point.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from torchmetrics.image.fid import FrechetInceptionDistance, NoTrainInceptionV3
from torchmetrics.image.kid import KernelInceptionDistance

from src.errors import ConfigError
from src.losses.perceptual import LPIPS

INCEPTION_FILE = "weights-inception-2015-12-05-6726825d.pth"
INCEPTION_URL = (
    "https://github.com/toshas/torch-fidelity/releases/download/v0.2.0/" + INCEPTION_FILE
)
INCEPTION_FEATURES = 2048


def patches(x: Tensor, size: int) -> Tensor:
    """All whole `size`² patches of (B, C, H, W) on the grid and on the grid shifted by size/2."""
    found = []
    for offset in (0, size // 2):
        part = x[..., offset:, offset:]
        h, w = part.shape[-2] // size, part.shape[-1] // size
        if h == 0 or w == 0:
            continue
        grid = part[..., : h * size, : w * size].unfold(-2, size, size).unfold(-2, size, size)
        # (B, C, h, w, size, size) -> (B·h·w, C, size, size)
        found.append(grid.permute(0, 2, 3, 1, 4, 5).reshape(-1, x.shape[1], size, size))
    return torch.cat(found) if found else x.new_zeros(0, x.shape[1], size, size)


def inception(weights: str | Path) -> NoTrainInceptionV3:
    """torch-fidelity's InceptionV3 (2048-d pool features) from a local file."""
    path = Path(str(weights))
    if not path.is_file():
        raise ConfigError(
            f"perceptual.inception_weights={path} does not exist: place torch-fidelity's "
            f"InceptionV3 weights there ({INCEPTION_FILE}, {INCEPTION_URL}). Nothing is downloaded."
        )
    net = NoTrainInceptionV3(
        name="inception-v3-compat",
        features_list=[str(INCEPTION_FEATURES)],
        feature_extractor_weights_path=str(path),
    )
    net.num_features = INCEPTION_FEATURES  # torchmetrics reads it instead of probing the net
    return net


class PerceptualMetrics:
    """LPIPS of each decoded image, and FID / KID of one rate point's patches.

    Args:
        lpips_weights: LPIPS directory (or "random", tests only); None skips LPIPS.
        lpips_net: "alex" (HiFIC) or "vgg".
        inception_weights: torch-fidelity's InceptionV3 file; None skips FID and KID.
        patch_size: side of the FID/KID patches (HiFIC: 256).
        kid_subset_size: KID's subset size (lowered to the patch count when fewer).
        device: where the networks run.
    """

    def __init__(
        self,
        lpips_weights: str | None = None,
        lpips_net: str = "alex",
        inception_weights: str | None = None,
        patch_size: int = 256,
        kid_subset_size: int = 50,
        device: str = "cpu",
    ) -> None:
        self.device = device
        self.lpips = (
            LPIPS(lpips_weights, lpips_net, key="perceptual.lpips_weights").to(device)
            if lpips_weights
            else None
        )
        self.inception = inception(inception_weights).to(device) if inception_weights else None
        self.patch_size = int(patch_size)
        self.kid_subset_size = int(kid_subset_size)
        self._real: list[Tensor] = []
        self._fake: list[Tensor] = []

    @classmethod
    def from_config(cls, cfg: Any, device: str = "cpu") -> PerceptualMetrics | None:
        """From evaluate.py's `perceptual` group, or None when it asks for nothing."""
        if not cfg or not (cfg.get("lpips_weights") or cfg.get("inception_weights")):
            return None
        return cls(**dict(cfg), device=device)

    def reset(self) -> None:
        """Forget the patches of the previous rate point."""
        self._real, self._fake = [], []

    @torch.no_grad()
    def image(self, x: Tensor, x_hat: Tensor) -> dict[str, float]:
        """Per-image figures of (1, 3, H, W) original and decoding; keeps patches for FID/KID."""
        figures = {}
        if self.lpips is not None:
            figures["lpips"] = float(self.lpips(x.to(self.device), x_hat.to(self.device)))
        if self.inception is not None:
            self._real.append(_to_uint8(patches(x, self.patch_size)))
            self._fake.append(_to_uint8(patches(x_hat, self.patch_size)))
        return figures

    @torch.no_grad()
    def dataset(self) -> dict[str, float]:
        """FID and KID (mean, std) over every patch seen since `reset`; empty without Inception."""
        if self.inception is None:
            return {}
        real, fake = torch.cat(self._real), torch.cat(self._fake)
        if real.shape[0] < 2:
            raise ConfigError(
                f"FID/KID need at least 2 patches of {self.patch_size}² and the images gave "
                f"{real.shape[0]}: lower perceptual.patch_size or evaluate more images"
            )
        # Inception runs once per patch; both metrics then take its features as they are.
        features = {
            is_real: torch.cat([self.inception(b.to(self.device)) for b in images.split(16)])
            for is_real, images in ((True, real), (False, fake))
        }
        fid = FrechetInceptionDistance(feature=_Precomputed())
        kid = KernelInceptionDistance(
            feature=_Precomputed(), subset_size=min(self.kid_subset_size, real.shape[0])
        )
        for metric in (fid, kid):
            for is_real, values in features.items():
                metric.update(values.cpu(), real=is_real)
        kid_mean, kid_std = kid.compute()
        return {
            "fid": float(fid.compute()),
            "kid": float(kid_mean),
            "kid_std": float(kid_std),
            "fid_patches": float(real.shape[0]),
        }


class _Precomputed(nn.Module):
    """Stands for the feature extractor when the metrics are handed Inception features."""

    num_features = INCEPTION_FEATURES

    def forward(self, features: Tensor) -> Tensor:
        return features


def _to_uint8(x: Tensor) -> Tensor:
    return (x.clamp(0, 1) * 255).round().to(torch.uint8).cpu()
