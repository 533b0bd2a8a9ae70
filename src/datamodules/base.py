"""The DataModule every image dataset shares: random crops to train, centre crops to validate,
whole images at batch 1 to test.

Where the images come from is the subclass's business (`_splits`); the rest is here:
- `small_images`: an image smaller than `crop` on either side is padded up to it by reflection
  ("pad", the default; QRes-VAE's `pad_if_needed`) or left out ("skip"). Either way the count is
  logged and kept in `stats`. `min_size` drops every image whose shorter side is below it
  (McQuic keeps only images of at least 512 x 512).
- `cache`: decode the training and validation images once into memory (small sets only).
- Workers: `num_workers`, `persistent_workers`, `pin_memory`, `prefetch_factor`. Each worker seeds
  its crop generator from torch's per-worker seed and the DDP rank (see `datasets.py`).
- Resuming: the training loader is torchdata's `StatefulDataLoader`, whose state (position in the
  epoch, the sampler's generator, the workers' base seed and each worker's crop generator) Lightning
  saves with every checkpoint and restores on `resume=`, so a resumed run reads the same batches.
- DDP: nothing here is rank-specific. Lightning (`use_distributed_sampler=True`, its default)
  replaces the training sampler with a `DistributedSampler` seeded by the global seed, so each
  rank reads a disjoint shard that reshuffles every epoch; validation shards are padded by
  repetition to equal length, which can count a few images twice in the logged mean.
"""

from __future__ import annotations

import logging
import zlib
from collections.abc import Sequence

import pytorch_lightning as pl
import torch
from torch.utils.data import DataLoader, Dataset
from torchdata.stateful_dataloader import StatefulDataLoader

from src.datamodules.datasets import (
    CenterCropDataset,
    FullImageDataset,
    ImageSource,
    MemorySource,
    RandomCropDataset,
    open_source,
)
from src.datamodules.downscale import check_downscale
from src.errors import ConfigError, DataError

log = logging.getLogger(__name__)

SMALL_IMAGE_POLICIES = ("pad", "skip")


def split_names(names: Sequence[str], val_fraction: float) -> tuple[list[int], list[int]]:
    """Train and validation indices chosen by a hash of each name: stable as images are added."""
    threshold = int(val_fraction * 2**32)
    val = [i for i, n in enumerate(names) if zlib.crc32(n.encode()) < threshold]
    chosen = set(val)
    train = [i for i in range(len(names)) if i not in chosen]
    if not val and len(train) > 1 and val_fraction > 0:
        val = [train.pop()]
    return train, val


def evenly_spaced(indices: list[int], limit: int | None) -> list[int]:
    """At most `limit` of `indices`, spread evenly over the list (all of them if limit is None)."""
    if limit is None or len(indices) <= limit:
        return indices
    return [indices[i * len(indices) // limit] for i in range(limit)]


class CropDataModule(pl.LightningDataModule):
    """Shared crops, policies and loaders (see the module docstring).

    Args:
        crop: training crop side.
        val_crop: validation crop side.
        val_crop_multiple: validate on whole images centre-cropped down to multiples of this
            instead of val_crop squares (None: squares); take val_batch_size=1 for mixed sizes.
        batch_size: training batch per device.
        val_batch_size: validation batch per device.
        num_workers: loader processes.
        repeat: random crops drawn from each image per epoch.
        val_fraction: share of images held out when the data has no separate validation split.
        small_images: "pad" or "skip" training images smaller than the crop.
        min_size: leave out training images whose shorter side is below this (0: keep all).
        cache: decode the images once and keep them in memory.
        val_path: validate and test on this folder or LMDB instead (e.g. Kodak).
        val_max_images: validate on at most this many images, evenly spread (None: all).
        persistent_workers: keep worker processes between epochs.
        pin_memory: page-locked batches for faster host-to-GPU copies.
        prefetch_factor: batches each worker prepares ahead (None: torch's default).
        downscale: [lo, hi]: scale each training image by a random factor in that range before
            the crop, upscaling images smaller than the crop (TF HiFIC: [0.75, 0.95]); None: off.
        flip: random horizontal flips of the training crops.
        scale_range: (lo, hi) scale jitter of the training crops (None: the photos' own scale).
        channel_shuffle: probability of permuting a training crop's colour channels.
    """

    def __init__(
        self,
        crop: int = 256,
        val_crop: int = 256,
        val_crop_multiple: int | None = None,
        batch_size: int = 8,
        val_batch_size: int = 8,
        num_workers: int = 0,
        repeat: int = 1,
        val_fraction: float = 0.1,
        small_images: str = "pad",
        min_size: int = 0,
        cache: bool = False,
        val_path: str | None = None,
        val_max_images: int | None = None,
        persistent_workers: bool = True,
        pin_memory: bool = False,
        prefetch_factor: int | None = None,
        downscale: Sequence[float] | None = None,
        flip: bool = True,
        scale_range: Sequence[float] | None = None,
        channel_shuffle: float = 0.0,
    ) -> None:
        super().__init__()
        if small_images not in SMALL_IMAGE_POLICIES:
            raise ConfigError(
                f"data.small_images={small_images!r}: choose one of {SMALL_IMAGE_POLICIES}"
            )
        if crop < 1 or val_crop < 1 or (val_crop_multiple is not None and val_crop_multiple < 1):
            raise ConfigError(
                f"data.crop={crop}, data.val_crop={val_crop} and data.val_crop_multiple="
                f"{val_crop_multiple} must be positive"
            )
        self.crop = crop
        self.val_crop = val_crop
        self.val_crop_multiple = val_crop_multiple
        self.batch_size = batch_size
        self.val_batch_size = val_batch_size
        self.num_workers = num_workers
        self.repeat = repeat
        self.val_fraction = val_fraction
        self.small_images = small_images
        self.min_size = min_size
        self.cache = cache
        self.val_path = val_path
        self.val_max_images = val_max_images
        self.persistent_workers = persistent_workers
        self.pin_memory = pin_memory
        self.prefetch_factor = prefetch_factor
        self.downscale = check_downscale(downscale)
        self.flip = flip
        self.scale_range = scale_range
        self.channel_shuffle = channel_shuffle
        self.train_set: RandomCropDataset | None = None
        self.val_set: CenterCropDataset | None = None
        self.test_set: FullImageDataset | None = None
        self.stats: dict[str, int] = {}
        self._splits_cache: tuple | None = None
        self._val_ready = False

    # -- where the images are -------------------------------------------------------------

    @property
    def location(self) -> str:
        """Where the data is, for messages."""
        raise NotImplementedError

    def _splits(self) -> tuple[ImageSource | None, list[int], ImageSource | None, list[int]]:
        """(train source, train indices, validation source, validation indices)."""
        raise NotImplementedError

    def _get_splits(self) -> tuple[ImageSource | None, list[int], ImageSource | None, list[int]]:
        if self._splits_cache is None:
            train, train_idx, val, val_idx = self._splits()
            if self.val_path is not None:
                val = open_source(self.val_path)
                val_idx = list(range(len(val)))
            self._splits_cache = (train, train_idx, val, val_idx)
        return self._splits_cache

    # -- Lightning hooks ------------------------------------------------------------------

    def setup(self, stage: str | None = None) -> None:
        """Validation/test images for every stage; the training set only to fit."""
        if not self._val_ready:
            self._setup_val()
            self._val_ready = True
        if stage in (None, "fit") and self.train_set is None:
            self._setup_train()

    def _setup_val(self) -> None:
        _, _, source, indices = self._get_splits()
        if source is None or not indices:
            log.info("%s: no validation images", self.location)
            return
        indices = evenly_spaced(indices, self.val_max_images)
        if self.cache:  # decoding leaves out the unreadable images: no header pass first
            source = MemorySource(source, indices)
            indices = list(range(len(source)))
        else:
            sizes = source.sizes(indices)
            indices = [i for i, s in zip(indices, sizes) if s is not None]
        if not indices:
            raise DataError(f"none of the validation images of {self.location} can be read")
        self.val_set = CenterCropDataset(source, indices, self.val_crop, self.val_crop_multiple)
        self.test_set = FullImageDataset(source, indices)

    def _setup_train(self) -> None:
        source, indices, _, _ = self._get_splits()
        if source is None:
            raise ConfigError(f"{self.location} is a test set: train on another data preset")
        if not indices:
            raise DataError(f"no training images found under {self.location}")
        sizes = source.sizes(indices)
        kept, stats = [], dict.fromkeys(("unreadable", "below_min_size", "small", "kept"), 0)
        for i, size in zip(indices, sizes):
            if size is None:
                stats["unreadable"] += 1
            elif min(size) < self.min_size:
                stats["below_min_size"] += 1
            else:
                small = min(size) < self.crop
                stats["small"] += small
                if not (small and self.small_images == "skip"):
                    kept.append(i)
        stats["kept"] = len(kept)
        self.stats = stats
        log.info(
            "%s: %d training images; %d smaller than the %d crop (%s), %d below min_size %d and "
            "%d unreadable left out; %d validation images",
            self.location,
            len(kept),
            stats["small"],
            self.crop,
            "padded" if self.small_images == "pad" else "skipped",
            stats["below_min_size"],
            self.min_size,
            stats["unreadable"],
            len(self.val_set) if self.val_set is not None else 0,
        )
        if not kept:
            raise DataError(
                f"none of the {len(indices)} training images of {self.location} is usable ({stats})"
            )
        if self.cache:
            source = MemorySource(source, kept)
            kept = list(range(len(source)))
        self.train_set = RandomCropDataset(
            source,
            kept,
            self.crop,
            self.repeat,
            self.downscale,
            self.flip,
            self.scale_range,
            self.channel_shuffle,
        )
        if len(self.train_set) < self.batch_size:
            raise ConfigError(
                f"data.batch_size={self.batch_size} exceeds the {len(self.train_set)} training "
                f"crops per epoch of {self.location}; lower it or raise data.repeat"
            )

    def _loader(self, dataset: Dataset, batch_size: int, shuffle: bool) -> DataLoader:
        """The training loader (shuffled) is resumable. A validation loader restarts at every
        pass and draws its workers' seed from a generator of its own: starting its workers never
        consumes the global random state that training's noise comes from."""
        workers = self.num_workers
        options = {} if shuffle else {"generator": torch.Generator()}
        return (StatefulDataLoader if shuffle else DataLoader)(
            dataset,
            batch_size=batch_size,
            shuffle=shuffle,
            num_workers=workers,
            drop_last=shuffle,
            persistent_workers=workers > 0 and self.persistent_workers,
            pin_memory=self.pin_memory,
            prefetch_factor=self.prefetch_factor if workers > 0 else None,
            **options,
        )

    def train_dataloader(self) -> DataLoader:
        return self._loader(self.train_set, self.batch_size, shuffle=True)

    def val_dataloader(self) -> DataLoader | list:
        if self.val_set is None:
            return []
        return self._loader(self.val_set, self.val_batch_size, shuffle=False)

    def test_dataloader(self) -> DataLoader:
        if self.test_set is None:
            raise DataError(f"no validation or test images under {self.location} to test on")
        return DataLoader(self.test_set, batch_size=1, num_workers=self.num_workers)

    @property
    def test_names(self) -> list[str]:
        """Names of the test images, in `test_dataloader` order (relative paths or LMDB keys)."""
        return self.test_set.names if self.test_set is not None else []
