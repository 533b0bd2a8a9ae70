"""DataModules over a folder of image files (or of LMDB databases, which read the same way).

`root/train` and `root/val` (or `valid`, `validation`, `test`) are used when they exist;
otherwise the images under `root` are split deterministically by a hash of their relative paths,
`val_fraction` of them for validation. Testing (evaluate.py) on such a flat folder uses every
image in it: a user pointing the evaluation at a folder of photos means all of them.
"""

from __future__ import annotations

import logging
from pathlib import Path

from src.datamodules.base import CropDataModule, split_names
from src.datamodules.datasets import FolderSource, ImageSource, open_source
from src.datamodules.images import list_images
from src.errors import DataError

log = logging.getLogger(__name__)

VAL_DIR_NAMES = ("val", "valid", "validation", "test")


def find_splits(
    root: Path, val_fraction: float
) -> tuple[ImageSource, list[int], ImageSource | None, list[int]]:
    """(train source, train indices, validation source, validation indices) under `root`."""
    if (root / "train").is_dir():
        train = open_source(root / "train")
        val_dir = next((root / n for n in VAL_DIR_NAMES if (root / n).is_dir()), None)
        val = open_source(val_dir) if val_dir is not None else None
        return train, list(range(len(train))), val, list(range(len(val) if val else 0))
    source = open_source(root)
    train_idx, val_idx = split_names(source.names, val_fraction)
    return source, train_idx, source, val_idx


class ImageFolderDataModule(CropDataModule):
    """Random crops + flips from a folder of images (arguments: `CropDataModule`'s + `root`)."""

    def __init__(self, root: str, **kwargs) -> None:
        super().__init__(**kwargs)
        self.root = Path(root)
        self._test_everything = False

    @property
    def location(self) -> str:
        return str(self.root)

    def setup(self, stage: str | None = None) -> None:
        """As `CropDataModule.setup`; a test on a flat folder (no `train/` in it) takes every
        image as a test image, not only the validation share of the name hash."""
        flat = self.val_path is None and not (self.root / "train").is_dir()
        if stage == "test" and flat and not self._test_everything:
            self._test_everything = True
            self._splits_cache, self._val_ready = None, False  # re-split: every image tests
        super().setup(stage)

    def _splits(self) -> tuple[ImageSource, list[int], ImageSource | None, list[int]]:
        train, train_idx, val, val_idx = find_splits(self.root, self.val_fraction)
        if self._test_everything:
            val_idx = sorted(train_idx + val_idx)
            log.info(
                "%s has no train/ and val/ subfolders: testing on all %d images in it",
                self.root,
                len(val_idx),
            )
        return train, train_idx, val, val_idx


class EvaluationFolderDataModule(CropDataModule):
    """Every image under `root` is a test (and validation) image; there is no training split.

    Kodak is one: `python evaluate.py ckpt=... data=kodak`, or validate a training run on it with
    `data.val_path=${paths.data_dir}/kodak`.
    """

    def __init__(self, root: str, pattern: str = "*", **kwargs) -> None:
        super().__init__(**kwargs)
        self.root = Path(root)
        self.pattern = pattern

    @property
    def location(self) -> str:
        return f"{self.root} (test images {self.pattern})"

    def _splits(self) -> tuple[None, list[int], ImageSource, list[int]]:
        paths = [p for p in list_images(self.root) if p.match(self.pattern)]
        if not paths:
            raise DataError(f"no images matching {self.pattern!r} under {self.root}")
        source = FolderSource(self.root, paths)
        return None, [], source, list(range(len(source)))
