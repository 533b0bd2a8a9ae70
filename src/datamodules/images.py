"""Finding and decoding images, and the crop datasets every DataModule shares."""

from __future__ import annotations

import logging
import random
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError
from torch import Tensor
from torch.utils.data import Dataset

from src.errors import DataError

log = logging.getLogger(__name__)

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".tif", ".tiff")


def list_images(root: str | Path) -> list[Path]:
    """Every image file under `root`, recursively, in a stable (sorted) order."""
    root = Path(root)
    if not root.is_dir():
        raise DataError(f"image folder {root} does not exist or is not a directory")
    return sorted(p for p in root.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())


def decode_rgb(path: str | Path) -> Tensor:
    """Decode an image file into a (3, H, W) uint8 tensor.

    EXIF orientation is applied; grayscale and palette images become RGB; an alpha channel is
    composited onto white (codecs code colour, not transparency).
    """
    with Image.open(path) as img:
        img = ImageOps.exif_transpose(img)
        if img.mode in ("RGBA", "LA") or (img.mode == "P" and "transparency" in img.info):
            rgba = img.convert("RGBA")
            white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
            img = Image.alpha_composite(white, rgba)
        if img.mode == "I;16" or img.mode == "I":
            arr = np.asarray(img, dtype=np.float64)
            img = Image.fromarray(np.clip(arr / 257.0, 0, 255).astype(np.uint8))
        img = img.convert("RGB")
        arr = np.asarray(img, dtype=np.uint8).copy()
    return torch.from_numpy(arr).permute(2, 0, 1).contiguous()


def decode_all(paths: Sequence[Path]) -> tuple[list[Tensor], list[Path]]:
    """Decode every path; a file that fails is skipped and reported, never fatal."""
    images, kept = [], []
    for path in paths:
        try:
            images.append(decode_rgb(path))
            kept.append(path)
        except (OSError, UnidentifiedImageError, ValueError, SyntaxError) as err:
            log.warning("skipped unreadable image %s: %s", path, err)
    return images, kept


def pad_to_at_least(img: Tensor, size: int) -> Tensor:
    """Reflect-pad (or replicate where reflection is too short) so both sides are >= size."""
    h, w = img.shape[-2:]
    pad_h, pad_w = max(0, size - h), max(0, size - w)
    if pad_h == 0 and pad_w == 0:
        return img
    mode = "reflect" if pad_h < h and pad_w < w else "replicate"
    padded = torch.nn.functional.pad(img[None].float(), (0, pad_w, 0, pad_h), mode=mode)
    return padded[0].to(img.dtype)


class RandomCropDataset(Dataset):
    """Random crops with horizontal flips from images held in memory, `repeat` crops per image.

    The images are decoded once; with a handful of photos an epoch of fresh random crops costs
    almost nothing, so the loader never makes a CPU training step wait.
    """

    def __init__(self, images: Sequence[Tensor], crop: int, repeat: int = 1) -> None:
        if not images:
            raise DataError("no training images to crop from")
        self.images = [pad_to_at_least(img, crop) for img in images]
        self.crop = crop
        self.repeat = max(1, int(repeat))

    def __len__(self) -> int:
        return len(self.images) * self.repeat

    def __getitem__(self, index: int) -> Tensor:
        img = self.images[index % len(self.images)]
        h, w = img.shape[-2:]
        top = random.randint(0, h - self.crop)
        left = random.randint(0, w - self.crop)
        patch = img[:, top : top + self.crop, left : left + self.crop]
        if random.random() < 0.5:
            patch = patch.flip(-1)
        return patch.float().div_(255)


class CenterCropDataset(Dataset):
    """Fixed centre crops (validation: the same pixels every time, batchable)."""

    def __init__(self, images: Sequence[Tensor], crop: int) -> None:
        if not images:
            raise DataError("no validation images")
        self.patches = []
        for img in images:
            img = pad_to_at_least(img, crop)
            h, w = img.shape[-2:]
            top, left = (h - crop) // 2, (w - crop) // 2
            self.patches.append(img[:, top : top + crop, left : left + crop].contiguous())

    def __len__(self) -> int:
        return len(self.patches)

    def __getitem__(self, index: int) -> Tensor:
        return self.patches[index].float().div(255)


class FullImageDataset(Dataset):
    """Whole images at their own size, for testing at batch 1 (the codec pads them)."""

    def __init__(self, paths: Sequence[Path]) -> None:
        self.paths = list(paths)

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> Tensor:
        return decode_rgb(self.paths[index]).float().div(255)
