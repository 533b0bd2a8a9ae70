"""LPIPS (Zhang et al. 2018, "net-lin", v0.1) through torchmetrics' implementation, from local files.

torchmetrics builds the network (its `_NoTrainLpips`: input scaling, AlexNet or VGG16 slices,
unit-normalised features, the learned non-negative 1×1 heads) and ships the v0.1 heads; the
ImageNet trunk it would download from torchvision. Nothing is downloaded here: the trunk is read
from a directory named in the config (torchvision's own file), the heads from the same directory
when it holds them, else from torchmetrics' copy. A missing file stops the run with a message
saying which public file to place where.

`weights="random"` builds the same network with random weights. It exists for tests (the same
code path without the files) and must be asked for explicitly; its values mean nothing.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
import torchmetrics.functional.image.lpips as tm_lpips
from torch import Tensor, nn

from src.errors import ConfigError

RANDOM = "random"
TORCHVISION_MODELS = "https://download.pytorch.org/models/"


@dataclass(frozen=True)
class _Trunk:
    """One supported feature network and the public files it needs."""

    build: str
    trunk_file: str  # torchvision's file name, also the last part of its download address
    heads_file: str  # the LPIPS v0.1 heads, as named in LPIPS and torchmetrics

    @property
    def trunk_url(self) -> str:
        return TORCHVISION_MODELS + self.trunk_file


TRUNKS = {
    "alex": _Trunk(build="alexnet", trunk_file="alexnet-owt-7be5be79.pth", heads_file="alex.pth"),
    "vgg": _Trunk(build="vgg16", trunk_file="vgg16-397923af.pth", heads_file="vgg.pth"),
}
SHIPPED_HEADS = Path(tm_lpips.__file__).parent / "lpips_models"


def lpips_files(net: str, directory: str | Path) -> tuple[Path, Path]:
    """The trunk and heads files LPIPS-`net` reads: the heads from `directory` if there,
    else torchmetrics' copy."""
    trunk = TRUNKS[net]
    directory = Path(directory)
    heads = directory / trunk.heads_file
    return directory / trunk.trunk_file, heads if heads.is_file() else SHIPPED_HEADS / heads.name


class LPIPS(nn.Module):
    """LPIPS distance per image, shape (B,), between images in [0, 1]; frozen, never trained.

    Args:
        weights: a directory holding the trunk file (see `TRUNKS`), or "random".
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
        # pnet_rand: torchmetrics leaves the trunk random instead of downloading it.
        self.net = tm_lpips._NoTrainLpips(net=net, pretrained=False, pnet_rand=True)
        if str(weights) == RANDOM:
            for head in self.net.lins:
                nn.init.uniform_(head.model[-1].weight, 0.0, 2.0 / head.model[-1].in_channels)
        else:
            _load(self.net, net, Path(str(weights)), key)
        self.requires_grad_(False)
        self.eval()

    def train(self, mode: bool = True) -> LPIPS:
        """Always in eval mode (the heads' dropout must stay off)."""
        return super().train(False)

    def forward(self, x: Tensor, y: Tensor) -> Tensor:
        return self.net(x, y, normalize=True).flatten()


def _load(net: nn.Module, name: str, directory: Path, key: str) -> None:
    """Fill the trunk and the heads from the files, or say what is missing or wrong."""
    trunk_path, heads_path = lpips_files(name, directory)
    if not trunk_path.is_file():
        spec = TRUNKS[name]
        raise ConfigError(
            f"{key}={directory}: LPIPS ({name}) needs {trunk_path} (torchvision's ImageNet "
            f"{spec.build} weights, {spec.trunk_url}); place that file in {directory}. The "
            f"LPIPS v0.1 heads ({spec.heads_file}) come with torchmetrics unless {directory} "
            f"holds its own. Nothing is downloaded. Tests alone may set {key}=random."
        )
    trunk = torch.load(trunk_path, map_location="cpu", weights_only=True)
    heads = torch.load(heads_path, map_location="cpu", weights_only=True)
    # torchmetrics keeps torchvision's layer indices inside its slices: slice2.3 is features.3.
    targets = [(trunk, "features." + n.split(".", 1)[1], p) for n, p in net.net.named_parameters()]
    targets += [
        (heads, f"lin{i}.model.1.weight", lin.model[-1].weight) for i, lin in enumerate(net.lins)
    ]
    wrong = [
        entry
        for source, entry, param in targets
        if entry not in source or tuple(source[entry].shape) != tuple(param.shape)
    ]
    if wrong:
        raise ConfigError(
            f"{key}={directory}: {trunk_path.name} / {heads_path.name} are not the LPIPS "
            f"{name} files (missing or misshapen: {', '.join(wrong[:3])})"
        )
    with torch.no_grad():
        for source, entry, param in targets:
            param.copy_(source[entry])
