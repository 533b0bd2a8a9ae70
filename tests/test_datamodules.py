"""Image folders and the sample set: splits, decoding odd images, skipping broken ones."""

from __future__ import annotations

import logging

import numpy as np
import pytest
import torch
from PIL import Image

from src.datamodules.folder import ImageFolderDataModule, find_splits
from src.datamodules.images import decode_rgb
from src.datamodules.sample import SAMPLE_PHOTOS, gather_sample_photos
from src.errors import DataError


def _photo(path, size=(80, 60), mode="RGB"):
    rng = np.random.default_rng(abs(hash(path.name)) % 2**32)
    arr = rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    Image.fromarray(arr).convert(mode).save(path)
    return path


def test_sample_set_is_gathered_once_into_train_and_val(tmp_path):
    root = gather_sample_photos(tmp_path / "sample")
    train = sorted(p.name for p in (root / "train").iterdir())
    val = sorted(p.name for p in (root / "val").iterdir())
    assert len(train) + len(val) == len(SAMPLE_PHOTOS) and val and train
    assert not set(train) & set(val)
    mtime = (root / "val" / val[0]).stat().st_mtime_ns
    gather_sample_photos(root)
    assert (root / "val" / val[0]).stat().st_mtime_ns == mtime


def test_flat_folder_is_split_by_name_deterministically(tmp_path):
    for i in range(30):
        _photo(tmp_path / f"img{i:02d}.png")
    source, train, _, val = find_splits(tmp_path, 0.2)
    assert len(source) == 30 and val and len(train) + len(val) == 30 and not set(train) & set(val)
    assert find_splits(tmp_path, 0.2)[1::2] == (train, val)


def test_odd_images_decode_to_rgb(tmp_path):
    assert decode_rgb(_photo(tmp_path / "g.png", mode="L")).shape == (3, 60, 80)
    assert decode_rgb(_photo(tmp_path / "p.png", mode="P")).shape == (3, 60, 80)
    rgba = Image.new("RGBA", (8, 8), (255, 0, 0, 0))  # fully transparent red over white
    rgba.save(tmp_path / "a.png")
    assert torch.equal(
        decode_rgb(tmp_path / "a.png"), torch.full((3, 8, 8), 255, dtype=torch.uint8)
    )
    Image.fromarray(np.full((6, 5), 65535, dtype=np.uint16)).save(tmp_path / "deep.png")
    assert int(decode_rgb(tmp_path / "deep.png").max()) == 255


def test_corrupt_and_small_images_are_handled(tmp_path, caplog):
    (tmp_path / "train").mkdir()
    (tmp_path / "val").mkdir()
    for i in range(3):
        _photo(tmp_path / "train" / f"ok{i}.png")
    _photo(tmp_path / "train" / "tiny.png", size=(20, 10))
    (tmp_path / "train" / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    _photo(tmp_path / "val" / "v.png")
    data = ImageFolderDataModule(str(tmp_path), crop=32, val_crop=32, batch_size=2)
    with caplog.at_level(logging.WARNING):
        data.setup("fit")
    assert "broken.jpg" in caplog.text
    assert len(data.train_set) == 4  # the small one is padded up to the crop, not dropped
    batch = next(iter(data.train_dataloader()))
    assert batch.shape == (2, 3, 32, 32) and 0 <= float(batch.min()) and float(batch.max()) <= 1
    assert next(iter(data.val_dataloader())).shape == (1, 3, 32, 32)
    assert next(iter(data.test_dataloader())).shape == (1, 3, 60, 80)


def test_empty_folder_is_a_clear_error(tmp_path):
    with pytest.raises(DataError, match="no training images found under"):
        ImageFolderDataModule(str(tmp_path)).setup("fit")
    with pytest.raises(DataError, match="does not exist"):
        ImageFolderDataModule(str(tmp_path / "missing")).setup("fit")


def test_validation_on_whole_images_cropped_to_multiples(tmp_path):
    """QRes-VAE's validation: each whole image, centre-cropped down to multiples of 64."""
    (tmp_path / "train").mkdir()
    (tmp_path / "val").mkdir()
    _photo(tmp_path / "train" / "a.png")
    wide = decode_rgb(_photo(tmp_path / "val" / "wide.png", size=(200, 140)))
    _photo(tmp_path / "val" / "tall.png", size=(70, 130))
    data = ImageFolderDataModule(str(tmp_path), val_crop_multiple=64, val_batch_size=1)
    data.setup("validate")
    shapes = sorted(tuple(data.val_set[i].shape) for i in range(len(data.val_set)))
    assert shapes == [(3, 128, 64), (3, 128, 192)]
    crop = next(data.val_set[i] for i in range(2) if data.val_set[i].shape[-1] == 192)
    assert torch.equal(crop, wide[:, 6:134, 4:196].float().div(255))  # the centre
