"""A DataModule over any folder of images.

`root/train` and `root/val` (or `valid`, `test`) are used when they exist; otherwise the images
under `root` are split deterministically by file name, `val_fraction` of them for validation.
"""

from __future__ import annotations

import logging
import zlib
from pathlib import Path

import pytorch_lightning as pl
from torch.utils.data import DataLoader

from src.datamodules.images import (
    CenterCropDataset,
    FullImageDataset,
    RandomCropDataset,
    decode_all,
    list_images,
)
from src.errors import DataError

log = logging.getLogger(__name__)

VAL_DIR_NAMES = ("val", "valid", "validation", "test")


def split_folder(root: Path, val_fraction: float) -> tuple[list[Path], list[Path]]:
    """Train and validation image paths under `root` (see the module docstring)."""
    if (root / "train").is_dir():
        train = list_images(root / "train")
        val_dir = next((root / n for n in VAL_DIR_NAMES if (root / n).is_dir()), None)
        val = list_images(val_dir) if val_dir is not None else []
    else:
        images = list_images(root)
        threshold = int(val_fraction * 2**32)
        val = [p for p in images if zlib.crc32(p.name.encode()) < threshold]
        train = [p for p in images if p not in set(val)]
        if not val and len(train) > 1:
            val = [train.pop()]
    if not train:
        raise DataError(f"no training images found under {root} (looked for common image files)")
    return train, val


class ImageFolderDataModule(pl.LightningDataModule):
    """Random crops + flips for training, fixed centre crops for validation, full images to test.

    Args:
        root: the folder of images.
        crop: training crop side.
        val_crop: validation crop side.
        batch_size: training batch per device.
        val_batch_size: validation batch per device.
        num_workers: loader processes.
        repeat: random crops drawn from each image per epoch.
        val_fraction: share of images held out when `root` has no train/val folders.
    """

    def __init__(
        self,
        root: str,
        crop: int = 256,
        val_crop: int = 256,
        batch_size: int = 8,
        val_batch_size: int = 8,
        num_workers: int = 0,
        repeat: int = 1,
        val_fraction: float = 0.1,
    ) -> None:
        super().__init__()
        self.root = Path(root)
        self.crop = crop
        self.val_crop = val_crop
        self.batch_size = batch_size
        self.val_batch_size = val_batch_size
        self.num_workers = num_workers
        self.repeat = repeat
        self.val_fraction = val_fraction
        self.train_set = self.val_set = None
        self.val_paths: list[Path] = []

    def setup(self, stage: str | None = None) -> None:
        if self.train_set is not None:
            return
        train_paths, self.val_paths = split_folder(self.root, self.val_fraction)
        train_images, kept = decode_all(train_paths)
        if not train_images:
            raise DataError(
                f"none of the {len(train_paths)} images under {self.root} could be read"
            )
        val_images, self.val_paths = decode_all(self.val_paths)
        log.info("%s: %d training and %d validation images", self.root, len(kept), len(val_images))
        self.train_set = RandomCropDataset(train_images, self.crop, self.repeat)
        self.val_set = CenterCropDataset(val_images, self.val_crop) if val_images else None

    def _loader(self, dataset, batch_size: int, shuffle: bool) -> DataLoader:
        return DataLoader(
            dataset,
            batch_size=batch_size,
            shuffle=shuffle,
            num_workers=self.num_workers,
            drop_last=shuffle,
            persistent_workers=self.num_workers > 0,
        )

    def train_dataloader(self) -> DataLoader:
        return self._loader(self.train_set, self.batch_size, shuffle=True)

    def val_dataloader(self) -> DataLoader | list:
        if self.val_set is None:
            return []
        return self._loader(self.val_set, self.val_batch_size, shuffle=False)

    def test_dataloader(self) -> DataLoader:
        if not self.val_paths:
            raise DataError(f"no validation images under {self.root} to test on")
        return DataLoader(
            FullImageDataset(self.val_paths), batch_size=1, num_workers=self.num_workers
        )
