"""The LMDB builder (bad files, resume, settings), verify/info, and the datasets that read it."""

from __future__ import annotations

import json
import logging
import shutil

import lmdb
import pytest
import torch
from torch.utils.data import DataLoader, DistributedSampler

import src.datamodules.datasets as datasets
import src.datamodules.lmdb as lmdb_module
from src.datamodules.datasets import FolderSource, RandomCropDataset
from src.datamodules.folder import ImageFolderDataModule
from src.datamodules.lmdb import (
    LmdbDataModule,
    LmdbSource,
    build_lmdb,
    folder_items,
    main,
    read_metadata,
)
from src.errors import ConfigError, DataError
from tests.dataset_files import write_bad_files, write_image

SIZES = [(80, 60), (64, 64), (100, 72), (72, 90), (40, 30), (120, 64), (66, 70), (90, 90)]


@pytest.fixture
def photos(tmp_path):
    """Eight good images (one small, in a subfolder, mixed formats) and three bad files."""
    src = tmp_path / "photos"
    for i, size in enumerate(SIZES):
        suffix = ".jpg" if i % 3 == 0 else ".png"
        write_image(src / ("sub" if i % 2 else "") / f"img{i}{suffix}", size)
    write_bad_files(src / "bad")
    return src


def _build(src, out, **kwargs):
    items, total = folder_items(src)
    options = {"source": str(src), "workers": 1, "total": total, "progress": False}
    return build_lmdb(items, out, **(options | kwargs))


def _contents(path):
    """Every key and value of every named database, and the metadata."""
    env = lmdb.open(str(path), readonly=True, lock=False, max_dbs=4)
    dump = {}
    with env.begin() as txn:
        for name in (b"images", b"sizes", b"build"):
            db = env.open_db(name, txn=txn, create=False)
            dump[name] = [(bytes(k), bytes(v)) for k, v in txn.cursor(db=db)]
    env.close()
    return dump, json.loads((path / "metadata.json").read_text())


def test_build_stores_original_bytes_and_reports_bad_files(photos, tmp_path):
    report = _build(photos, tmp_path / "db", min_size=50)
    meta = read_metadata(tmp_path / "db")
    skipped = {s["key"]: s["reason"] for s in meta["skipped"]}
    assert set(skipped) == {"bad/corrupt.jpg", "bad/truncated.jpg", "bad/notes.png", "img4.png"}
    assert "truncated" in skipped["bad/truncated.jpg"]
    assert "not an image" in skipped["bad/notes.png"]
    assert "40x30 is smaller than the minimum size 50" in skipped["img4.png"]
    assert report.count == meta["count"] == 7 and report.added == 7 and len(report.skipped) == 4
    keys = [e[0] for e in meta["images"]]
    assert keys == sorted(keys) and "img0.jpg" in keys and "sub/img1.png" in keys
    source = LmdbSource(tmp_path / "db")
    i = source.names.index("img0.jpg")
    assert source.read_bytes(i) == (photos / "img0.jpg").read_bytes()  # never re-encoded
    assert meta["images"][i][1:] == [80, 60, (photos / "img0.jpg").stat().st_size]
    assert meta["total_bytes"] == sum(e[3] for e in meta["images"])
    assert meta["filter"]["min_size"] == 50 and meta["source"] == str(photos)


@pytest.mark.slow
def test_parallel_build_equals_the_serial_one(photos, tmp_path):
    _build(photos, tmp_path / "serial")
    report = _build(photos, tmp_path / "parallel", workers=2)
    assert report.count == 8 and len(report.skipped) == 3
    assert _contents(tmp_path / "parallel") == _contents(tmp_path / "serial")


def test_interrupted_build_resumes_to_the_same_database(photos, tmp_path, monkeypatch):
    _build(photos, tmp_path / "clean")
    real_check, calls = lmdb_module._check, []

    def dies_on_the_seventh(*args):
        calls.append(args[0])
        if len(calls) == 7:
            raise KeyboardInterrupt
        return real_check(*args)

    monkeypatch.setattr(lmdb_module, "_check", dies_on_the_seventh)
    monkeypatch.setattr(lmdb_module, "_COMMIT_ENTRIES", 2)
    with pytest.raises(KeyboardInterrupt):
        _build(photos, tmp_path / "resumed")
    with pytest.raises(DataError, match="did not finish: run the same build command again"):
        LmdbSource(tmp_path / "resumed")
    monkeypatch.setattr(lmdb_module, "_check", real_check)
    report = _build(photos, tmp_path / "resumed")
    assert (report.existing, report.added) == (3, 5)  # 3 bad files, then 3 stored, then killed
    assert _contents(tmp_path / "resumed") == _contents(tmp_path / "clean")
    again = _build(photos, tmp_path / "resumed")
    assert (again.added, again.existing) == (0, 8)
    with pytest.raises(ConfigError, match="min_size=0, not 64"):
        _build(photos, tmp_path / "resumed", min_size=64)


def test_verify_and_info_commands(photos, tmp_path, capsys):
    db = tmp_path / "db"
    assert main(["build", str(photos), str(db), "--workers", "1", "--min-size", "50"]) == 0
    out = capsys.readouterr().out
    assert "7 images" in out and "skipped" in out and "truncated.jpg" in out
    assert main(["info", str(db)]) == 0
    out = capsys.readouterr().out
    assert "count: 7" in out and "min_size_filter: 50" in out
    assert main(["verify", str(db), "--workers", "1"]) == 0
    assert "OK" in capsys.readouterr().out
    env = lmdb.open(str(db), max_dbs=4)
    with env.begin(write=True) as txn:
        txn.put(b"sub/img3.jpg", b"\xff\xd8\xff garbage", db=env.open_db(b"images", txn=txn))
    env.close()
    assert main(["verify", str(db), "--workers", "1"]) == 1
    assert "sub/img3.jpg: not an image" in capsys.readouterr().out
    assert main(["info", str(tmp_path / "nothing")]) == 2


def test_folder_and_lmdb_give_the_same_crops_for_the_same_seed(photos, tmp_path):
    shutil.rmtree(photos / "bad")
    _build(photos, tmp_path / "db")
    folder, db = FolderSource(photos), LmdbSource(tmp_path / "db")
    assert folder.names == db.names
    crops = []
    for source in (folder, db):
        indices = range(len(source))
        torch.manual_seed(3)
        dataset = RandomCropDataset(source, indices, crop=32, repeat=2)
        crops.append(torch.stack([dataset[i] for i in range(len(dataset))]))
    assert torch.equal(crops[0], crops[1])

    batches = []
    for module in (
        ImageFolderDataModule(str(photos), crop=32, batch_size=4, val_fraction=0.3, repeat=3),
        LmdbDataModule(str(tmp_path / "db"), crop=32, batch_size=4, val_fraction=0.3, repeat=3),
    ):
        module.setup("fit")
        torch.manual_seed(5)
        batches.append([b for _, b in zip(range(2), module.train_dataloader())])
        assert module.val_set.names == module.test_names
    assert all(torch.equal(a, b) for a, b in zip(*batches))


def test_lmdb_datamodule_reads_train_and_val_databases(photos, tmp_path):
    _build(photos / "sub", tmp_path / "set" / "train")
    _build(photos, tmp_path / "set" / "val")
    data = LmdbDataModule(str(tmp_path / "set"), crop=66, val_crop=40, batch_size=2)
    data.setup("fit")
    assert len(data.train_set) == 4 and data.stats["small"] == 2  # 64x64 and 120x64: padded
    assert next(iter(data.train_dataloader())).shape == (2, 3, 66, 66)
    assert next(iter(data.val_dataloader())).shape == (8, 3, 40, 40)
    tests = list(data.test_dataloader())
    assert [x.shape[-2:] for x in tests][0] == (60, 80) and len(tests) == 8
    assert data.test_names[0] == "img0.jpg"
    with pytest.raises(DataError, match="no LMDB database at"):
        LmdbDataModule(str(photos)).setup("fit")


def test_small_images_are_padded_or_skipped_and_counted(photos, tmp_path, caplog):
    _build(photos, tmp_path / "db")
    common = {"crop": 64, "batch_size": 2, "val_fraction": 0.0}
    with caplog.at_level(logging.INFO):
        pad = LmdbDataModule(str(tmp_path / "db"), **common)
        pad.setup("fit")
    assert pad.stats == {"unreadable": 0, "below_min_size": 0, "small": 2, "kept": 8}
    assert "2 smaller than the 64 crop (padded)" in caplog.text
    assert next(iter(pad.train_dataloader())).shape == (2, 3, 64, 64)
    skip = LmdbDataModule(str(tmp_path / "db"), small_images="skip", **common)
    skip.setup("fit")
    assert skip.stats["kept"] == 6 and skip.stats["small"] == 2
    large = LmdbDataModule(str(tmp_path / "db"), min_size=72, **common)
    large.setup("fit")
    assert large.stats["below_min_size"] == 5 and large.stats["kept"] == 3
    with pytest.raises(ConfigError, match="data.small_images='crop'"):
        LmdbDataModule(str(tmp_path / "db"), small_images="crop")


def test_ddp_shards_are_disjoint_and_ranks_crop_differently(photos, tmp_path, monkeypatch):
    _build(photos, tmp_path / "db")
    dataset = RandomCropDataset(LmdbSource(tmp_path / "db"), range(8), crop=32, repeat=3)
    shards = [
        list(DistributedSampler(dataset, num_replicas=2, rank=r, shuffle=True, seed=1))
        for r in (0, 1)
    ]
    assert not set(shards[0]) & set(shards[1])
    assert sorted(shards[0] + shards[1]) == list(range(24))
    torch.manual_seed(0)
    rank0 = torch.stack([dataset[i] for i in range(8)])
    monkeypatch.setattr(datasets, "_rank", lambda: 1)
    dataset._rng = None
    torch.manual_seed(0)
    rank1 = torch.stack([dataset[i] for i in range(8)])
    assert not torch.equal(rank0, rank1)


@pytest.mark.slow
def test_seeded_workers_repeat_their_crops(photos, tmp_path):
    _build(photos, tmp_path / "db")
    dataset = RandomCropDataset(LmdbSource(tmp_path / "db"), range(8), crop=24, repeat=2)

    def epoch(seed):
        torch.manual_seed(seed)
        return torch.cat(list(DataLoader(dataset, batch_size=4, shuffle=True, num_workers=2)))

    first = epoch(0)
    assert torch.equal(first, epoch(0)) and not torch.equal(first, epoch(1))
    dataset[0]  # the main process holds the database open too now: workers must still open it
    assert epoch(0).shape == first.shape


def test_an_image_that_fails_while_training_is_replaced_and_logged(tmp_path, caplog):
    write_image(tmp_path / "a.png", (40, 40))
    write_image(tmp_path / "b.png", (40, 40))
    whole = (tmp_path / "a.png").read_bytes()
    (tmp_path / "a.png").write_bytes(whole[: len(whole) - 200])  # header fine, pixels cut
    dataset = RandomCropDataset(FolderSource(tmp_path), [0, 1], crop=40)
    with caplog.at_level(logging.WARNING):
        crop = dataset[0]
        dataset[0]
    assert torch.equal(crop, dataset[1]) or crop.shape == (3, 40, 40)
    assert caplog.text.count("replaced by the next one") == 1 and "a.png" in caplog.text
