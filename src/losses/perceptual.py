"""LPIPS (Zhang et al. 2018, "net-lin", v0.1), built here and loaded from local files only.

LPIPS compares unit-normalised feature maps of an ImageNet classifier (AlexNet by default, as
HiFIC trains and reports with; VGG16 optionally) through learned non-negative 1×1 "linear heads",
averaged over space and summed over five layers. Nothing is downloaded: the trunk's ImageNet
weights and the heads come from a directory named in the config, and a missing file stops the run
with a message saying which public file to place where.

`weights="random"` builds the same network with random weights. It exists for tests (the same
code path without the files) and must be asked for explicitly; its values mean nothing.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
import torchvision
from torch import Tensor, nn

from src.errors import ConfigError

RANDOM = "random"
TORCHVISION_MODELS = "https://download.pytorch.org/models/"


@dataclass(frozen=True)
class _Trunk:
    """One supported feature network: where LPIPS taps it and which public files it needs."""

    build: str
    taps: tuple[int, ...]  # index (exclusive) of the ReLU ending each of the five slices
    channels: tuple[int, ...]
    trunk_file: str  # torchvision's file name, also the last part of its download address
    heads_file: str

    @property
    def trunk_url(self) -> str:
        return TORCHVISION_MODELS + self.trunk_file


TRUNKS = {
    "alex": _Trunk(
        build="alexnet",
        taps=(2, 5, 8, 10, 12),
        channels=(64, 192, 384, 256, 256),
        trunk_file="alexnet-owt-7be5be79.pth",
        heads_file="alex.pth",
    ),
    "vgg": _Trunk(
        build="vgg16",
        taps=(4, 9, 16, 23, 30),
        channels=(64, 128, 256, 512, 512),
        trunk_file="vgg16-397923af.pth",
        heads_file="vgg.pth",
    ),
}
HEADS_SOURCE = (
    "lpips/weights/v0.1/{name} of github.com/richzhang/PerceptualSimilarity "
    "(also shipped inside the `lpips` pip package)"
)


def lpips_files(net: str, directory: str | Path) -> tuple[Path, Path]:
    """The trunk and heads files LPIPS-`net` reads from `directory`."""
    trunk = TRUNKS[net]
    directory = Path(directory)
    return directory / trunk.trunk_file, directory / trunk.heads_file


def _missing_message(net: str, directory: Path, missing: list[Path], key: str) -> str:
    trunk = TRUNKS[net]
    return (
        f"{key}={directory}: LPIPS ({net}) needs two local files and {', '.join(map(str, missing))} "
        f"is missing. Place in {directory}: {trunk.trunk_file} (torchvision's ImageNet "
        f"{trunk.build} weights, {trunk.trunk_url}) and {trunk.heads_file} (LPIPS v0.1 linear "
        f"heads, {HEADS_SOURCE.format(name=trunk.heads_file)}). Nothing is downloaded. Tests "
        f"alone may set {key}=random."
    )


class LPIPS(nn.Module):
    """LPIPS distance per image, shape (B,), between images in [0, 1]; frozen, never trained.

    Args:
        weights: a directory holding the trunk and heads files (see `TRUNKS`), or "random".
        net: "alex" (HiFIC's choice) or "vgg".
        key: the config key that named `weights`, quoted in error messages.
    """

    def __init__(self, weights: str | Path, net: str = "alex", key: str = "lpips_weights") -> None:
        super().__init__()
        if net not in TRUNKS:
            raise ConfigError(f"LPIPS net must be one of {sorted(TRUNKS)}, got {net!r}")
        if weights is None or str(weights) == "":
            raise ConfigError(
                f"{key} is not set: name the directory with the LPIPS files, "
                f"or {key}=random in tests"
            )
        spec = TRUNKS[net]
        features = getattr(torchvision.models, spec.build)(weights=None).features
        heads = nn.ModuleList(nn.Conv2d(c, 1, 1, bias=False) for c in spec.channels)
        if str(weights) == RANDOM:
            for head, c in zip(heads, spec.channels):
                nn.init.uniform_(head.weight, 0.0, 2.0 / c)  # heads are non-negative in LPIPS
        else:
            _load(features, heads, net, Path(str(weights)), key)
        bounds = (0, *spec.taps)
        self.slices = nn.ModuleList(
            features[start:end] for start, end in zip(bounds[:-1], bounds[1:])
        )
        self.heads = heads
        # LPIPS's input scaling of [-1, 1] images (its ScalingLayer constants).
        self.register_buffer("shift", torch.tensor([-0.030, -0.088, -0.188]).view(1, 3, 1, 1))
        self.register_buffer("scale", torch.tensor([0.458, 0.448, 0.450]).view(1, 3, 1, 1))
        self.requires_grad_(False)
        self.eval()

    def train(self, mode: bool = True) -> LPIPS:
        """Always in eval mode (AlexNet's dropout is not in the trunk, but stay safe)."""
        return super().train(False)

    def forward(self, x: Tensor, y: Tensor) -> Tensor:
        a = ((x * 2 - 1) - self.shift) / self.scale
        b = ((y * 2 - 1) - self.shift) / self.scale
        total = x.new_zeros(x.shape[0])
        for block, head in zip(self.slices, self.heads):
            a, b = block(a), block(b)
            diff = (_unit(a) - _unit(b)).pow(2)
            total = total + head(diff).mean(dim=(1, 2, 3))
        return total


def _unit(features: Tensor, eps: float = 1e-10) -> Tensor:
    """Each pixel's feature vector divided by its L2 norm."""
    return features / (features.pow(2).sum(dim=1, keepdim=True).sqrt() + eps)


def _load(
    features: nn.Sequential, heads: nn.ModuleList, net: str, directory: Path, key: str
) -> None:
    """Fill the trunk and the heads from the two files in `directory`, or say what is missing."""
    trunk_path, heads_path = lpips_files(net, directory)
    missing = [p for p in (trunk_path, heads_path) if not p.is_file()]
    if missing:
        raise ConfigError(_missing_message(net, directory, missing, key))
    trunk = torch.load(trunk_path, map_location="cpu", weights_only=True)
    lin = torch.load(heads_path, map_location="cpu", weights_only=True)
    try:
        features.load_state_dict(
            {k[len("features.") :]: v for k, v in trunk.items() if k.startswith("features.")}
        )
        with torch.no_grad():
            for i, head in enumerate(heads):
                head.weight.copy_(lin[f"lin{i}.model.1.weight"])
    except (KeyError, RuntimeError) as err:
        raise ConfigError(
            f"{key}={directory}: {trunk_path.name} / {heads_path.name} are not the LPIPS "
            f"{net} files ({err})"
        ) from err
