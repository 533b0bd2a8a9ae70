"""The built-in sample set: real photos that ship inside installed PyPI packages.

On first use the colour photographs of scikit-image, scikit-learn and matplotlib are copied into
`root/train` and `root/val`, byte for byte; after that the set is an ordinary image folder.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import shutil
from pathlib import Path

from src.datamodules.folder import ImageFolderDataModule
from src.errors import DataError

log = logging.getLogger(__name__)

# (package, folder inside the package, file, split). Colour photographs only: the grayscale,
# synthetic and RGBA logo images of these packages are left out.
SAMPLE_PHOTOS = (
    ("skimage", "data", "astronaut.png", "train"),
    ("skimage", "data", "hubble_deep_field.jpg", "train"),
    ("skimage", "data", "ihc.png", "train"),
    ("skimage", "data", "motorcycle_left.png", "train"),
    ("skimage", "data", "motorcycle_right.png", "train"),
    ("skimage", "data", "retina.jpg", "train"),
    ("skimage", "data", "rocket.jpg", "train"),
    ("sklearn", "datasets/images", "china.jpg", "train"),
    ("matplotlib", "mpl-data/sample_data", "grace_hopper.jpg", "train"),
    ("skimage", "data", "chelsea.png", "val"),
    ("skimage", "data", "coffee.png", "val"),
    ("sklearn", "datasets/images", "flower.jpg", "val"),
)


def _package_dir(package: str) -> Path:
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise DataError(f"the sample photos need the package {package!r}; install it with pip")
    return Path(next(iter(spec.submodule_search_locations)))


def gather_sample_photos(root: str | Path) -> Path:
    """Copy the sample photos into `root/{train,val}` unless they are there already."""
    root = Path(root)
    for package, folder, name, split in SAMPLE_PHOTOS:
        target = root / split / f"{package}-{name}"
        if target.exists():
            continue
        source = _package_dir(package) / folder / name
        if not source.is_file():
            raise DataError(f"sample photo {source} is missing from the installed {package}")
        target.parent.mkdir(parents=True, exist_ok=True)
        partial = target.with_name(f".{target.name}.{os.getpid()}.part")
        shutil.copyfile(source, partial)
        os.replace(partial, target)  # atomic: several DDP processes may gather at once
        log.info("sample set: copied %s", source)
    return root


class SampleDataModule(ImageFolderDataModule):
    """The image-folder DataModule over the built-in sample photos (gathered on first use).

    Twelve photos: they are decoded once and held in memory (`cache=True`) by default.
    """

    def __init__(self, root: str, cache: bool = True, **kwargs) -> None:
        super().__init__(root, cache=cache, **kwargs)

    def prepare_data(self) -> None:
        gather_sample_photos(self.root)

    def setup(self, stage: str | None = None) -> None:
        gather_sample_photos(self.root)  # idempotent; covers processes that skipped prepare_data
        super().setup(stage)
