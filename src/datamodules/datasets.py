"""Image sources (a folder, an LMDB database, images held in memory) and the crop datasets.

A source is a list of named images that decode on demand; the datasets pick indices of a source
and turn them into training crops, validation centre crops or whole test images.

Randomness: training crops and flips come from a generator each process seeds on first use from
the DataLoader's per-worker seed (torch derives it from the global seed, so `seed=` fixes the
crops) and the DDP rank (so ranks crop differently even with `num_workers=0`). The crops depend
on nothing else: a folder and the LMDB built from it give the same crops in the same order.
"""

from __future__ import annotations

import itertools
import logging
import math
import os
import random
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from PIL import Image
from torch import Tensor
from torch.utils.data import Dataset, get_worker_info

from src.datamodules.downscale import check_downscale, random_downscaled_crop
from src.datamodules.images import (
    decode_rgb,
    image_size,
    list_images,
    pad_to_at_least,
    pil_to_tensor,
)
from src.errors import ConfigError, DataError
from src.utils.random_state import capture_random_state, restore_random_state

log = logging.getLogger(__name__)

Size = tuple[int, int]  # (width, height) of the upright image


class ImageSource:
    """Named images that decode on demand. Subclasses set `names` and implement the methods."""

    names: list[str]

    def __len__(self) -> int:
        return len(self.names)

    def load(self, index: int) -> Tensor:
        """The decoded (3, H, W) uint8 image; `DataError` if it cannot be decoded."""
        raise NotImplementedError

    def sizes(self, indices: Sequence[int]) -> list[Size | None]:
        """Sizes of the given images without decoding their pixels; None where unreadable."""
        raise NotImplementedError


class FolderSource(ImageSource):
    """Every image file under a folder, named by relative path."""

    def __init__(self, root: str | Path, paths: Sequence[Path] | None = None) -> None:
        self.root = Path(root)
        self.paths = list(paths) if paths is not None else list_images(self.root)
        self.names = [p.relative_to(self.root).as_posix() for p in self.paths]

    def load(self, index: int) -> Tensor:
        return decode_rgb(self.paths[index])

    def sizes(self, indices: Sequence[int]) -> list[Size | None]:
        found: list[Size | None] = []
        for i in indices:
            try:
                found.append(image_size(self.paths[i]))
            except DataError as err:
                log.warning("skipped unreadable image: %s", err)
                found.append(None)
        return found


class MemorySource(ImageSource):
    """Another source's images decoded once and held in memory (small sets: no decode per crop)."""

    def __init__(self, source: ImageSource, indices: Sequence[int]) -> None:
        self.names, self.images = [], []
        for i in indices:
            try:
                self.images.append(source.load(i))
                self.names.append(source.names[i])
            except DataError as err:
                log.warning("skipped unreadable image: %s", err)

    def load(self, index: int) -> Tensor:
        return self.images[index]

    def sizes(self, indices: Sequence[int]) -> list[Size | None]:
        return [(self.images[i].shape[-1], self.images[i].shape[-2]) for i in indices]


def open_source(path: str | Path) -> ImageSource:
    """An LMDB database (a folder holding `data.mdb`) or else a folder of image files."""
    path = Path(path)
    if (path / "data.mdb").is_file():
        from src.datamodules.lmdb import LmdbSource

        return LmdbSource(path)
    return FolderSource(path)


def _rank() -> int:
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


class _Subset(Dataset):
    """Indices into a source, with a fallback to the next image when one fails to decode."""

    def __init__(self, source: ImageSource, indices: Sequence[int]) -> None:
        if not len(indices):
            raise DataError("no images to read")
        self.source = source
        self.indices = list(indices)
        self._failed: set[int] = set()

    def _load(self, position: int) -> Tensor:
        """Decode the image at `position`, or the next one that decodes (logged once each)."""
        for step in range(len(self.indices)):
            pos = (position + step) % len(self.indices)
            try:
                return self.source.load(self.indices[pos])
            except DataError as err:
                if pos not in self._failed:
                    self._failed.add(pos)
                    log.warning("unreadable image replaced by the next one: %s", err)
        raise DataError("none of the images could be decoded")

    @property
    def names(self) -> list[str]:
        return [self.source.names[i] for i in self.indices]


class RandomCropDataset(_Subset):
    """Random `crop`-sized crops with horizontal flips, `repeat` per image per epoch.

    Images smaller than the crop are padded (reflection) up to it; drop them beforehand to skip
    them instead (see `CropDataModule`'s `small_images`). `downscale=(lo, hi)` scales each image
    by a random factor first, upscaling small ones instead of padding them (the TF HiFIC
    reference, `src/datamodules/downscale.py`); `flip=False` keeps crops unflipped (as it does).
    Two augmentations fight memorising a small training set (both off by default):
    - `scale_range=(lo, hi)`: each crop is taken at a scale drawn log-uniformly from the range
      (0.5: a region twice the crop's side, downsampled with antialiasing), so the codec sees
      textures and edges at many sizes, not only the photos' own.
    - `channel_shuffle`: the probability that a crop's colour channels are permuted (a random
      order other than RGB), so the codec meets colours that the few photos never show.
    """

    def __init__(
        self,
        source: ImageSource,
        indices: Sequence[int],
        crop: int,
        repeat: int = 1,
        downscale: Sequence[float] | None = None,
        flip: bool = True,
        scale_range: Sequence[float] | None = None,
        channel_shuffle: float = 0.0,
    ) -> None:
        super().__init__(source, indices)
        if scale_range is not None:
            lo, hi = (float(v) for v in scale_range)
            if not 0 < lo <= hi:
                raise ConfigError(
                    f"data.scale_range={list(scale_range)} must be (lo, hi), 0 < lo <= hi"
                )
            scale_range = (lo, hi)
        if not 0.0 <= channel_shuffle <= 1.0:
            raise ConfigError(f"data.channel_shuffle={channel_shuffle} is a probability in [0, 1]")
        self.crop = crop
        self.repeat = max(1, int(repeat))
        self.downscale = check_downscale(downscale)
        self.flip = flip
        self.scale_range = scale_range
        self.channel_shuffle = channel_shuffle
        self._rng: random.Random | None = None
        self._rng_owner: tuple[int, int] | None = None

    def __len__(self) -> int:
        return len(self.indices) * self.repeat

    def generator(self) -> random.Random:
        """This process's crop generator, seeded on first use (see the module docstring)."""
        info = get_worker_info()
        owner = (os.getpid(), info.id if info is not None else -1)
        if self._rng is None or self._rng_owner != owner:
            seed = info.seed if info is not None else torch.initial_seed()
            self._rng = random.Random(f"crops-{seed}-{_rank()}")
            self._rng_owner = owner
        return self._rng

    def state_dict(self) -> dict[str, Any]:
        """This process's crop generator, and in a loader worker the worker's global random state
        (torchdata's `StatefulDataLoader` saves it per worker, so a resumed run crops the same)."""
        state: dict[str, Any] = {"crops": self.generator().getstate()}
        if get_worker_info() is not None:
            state["worker"] = capture_random_state()
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue from a state `state_dict` returned (in the process that will crop)."""
        version, internal, gauss_next = state["crops"]
        self.generator().setstate((version, tuple(internal), gauss_next))
        if "worker" in state and get_worker_info() is not None:
            restore_random_state(state["worker"])

    def _region_side(self, rng: random.Random, h: int, w: int) -> int:
        """Side of the source region that becomes the crop (the crop itself without jitter)."""
        if self.scale_range is None:
            return self.crop
        lo, hi = self.scale_range
        scale = math.exp(rng.uniform(math.log(lo), math.log(hi)))
        return max(1, min(h, w, round(self.crop / scale)))

    def __getitem__(self, index: int) -> Tensor:
        img = self._load(index % len(self.indices))
        rng = self.generator()
        if self.downscale is not None:
            patch = random_downscaled_crop(img, self.crop, self.downscale, rng)
        else:
            img = pad_to_at_least(img, self.crop)
            h, w = img.shape[-2:]
            side = self._region_side(rng, h, w)
            top = rng.randint(0, h - side)
            left = rng.randint(0, w - side)
            patch = img[:, top : top + side, left : left + side]
            if side != self.crop:  # Pillow's bilinear filter widens with the factor: antialiased
                region = Image.fromarray(patch.permute(1, 2, 0).numpy())
                patch = pil_to_tensor(region.resize((self.crop, self.crop), Image.BILINEAR))
        patch = patch.float()
        if self.flip and rng.random() < 0.5:
            patch = patch.flip(-1)
        if self.channel_shuffle > 0 and rng.random() < self.channel_shuffle:
            order = rng.choice(_SHUFFLED_ORDERS)
            patch = patch[list(order)]
        return patch.div_(255)


# Every order of the three channels but RGB itself.
_SHUFFLED_ORDERS = tuple(p for p in itertools.permutations(range(3)) if p != (0, 1, 2))


def center_crop(img: Tensor, crop: int) -> Tensor:
    """The `crop` x `crop` centre of an image, padded first if it is smaller."""
    img = pad_to_at_least(img, crop)
    h, w = img.shape[-2:]
    top, left = (h - crop) // 2, (w - crop) // 2
    return img[:, top : top + crop, left : left + crop]


def center_crop_to_multiple(img: Tensor, multiple: int) -> Tensor:
    """The centre of an image cut down to sides that are multiples of `multiple` (padded up to
    one `multiple` first if a side is shorter)."""
    img = pad_to_at_least(img, multiple)
    h, w = img.shape[-2:]
    ch, cw = h // multiple * multiple, w // multiple * multiple
    top, left = (h - ch) // 2, (w - cw) // 2
    return img[:, top : top + ch, left : left + cw]


class CenterCropDataset(_Subset):
    """Fixed centre crops (validation: the same pixels every time): `crop` x `crop` squares,
    batchable; or, with `multiple`, whole images cut down to multiples of it (QRes-VAE's
    validation on full Kodak images), batchable only where the sizes agree."""

    def __init__(
        self, source: ImageSource, indices: Sequence[int], crop: int, multiple: int | None = None
    ) -> None:
        super().__init__(source, indices)
        self.crop = crop
        self.multiple = multiple

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, index: int) -> Tensor:
        img = self._load(index)
        if self.multiple:
            return center_crop_to_multiple(img, self.multiple).float().div(255)
        return center_crop(img, self.crop).float().div(255)


class FullImageDataset(_Subset):
    """Whole images at their own size, for testing at batch 1 (the codec pads them).

    A test image that cannot be decoded is an error, never silently replaced.
    """

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, index: int) -> Tensor:
        return self.source.load(self.indices[index]).float().div(255)
