"""Each preparer on a tiny download in the layout people get, and every data preset."""

from __future__ import annotations

import io
import pickle
import tarfile
import zipfile
from pathlib import Path

import hydra
import numpy as np
import pytest
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import open_dict

from src.datamodules.base import CropDataModule
from src.datamodules.folder import EvaluationFolderDataModule
from src.datamodules.images import decode_rgb
from src.datamodules.lmdb import LmdbDataModule, LmdbSource, read_metadata
from src.datamodules.prepare import detect_split, main, prepare
from src.errors import ConfigError, DataError
from src.training import train
from tests.dataset_files import image_bytes, write_image
from tests.helpers import REPO, run_script

PRESETS = sorted(p.stem for p in (REPO / "conf" / "data").glob("*.yaml"))


def _zip(path: Path, files: dict[str, bytes]) -> Path:
    with zipfile.ZipFile(path, "w") as archive:
        for name, data in files.items():
            archive.writestr(name, data)
    return path


def _tar(path: Path, files: dict[str, bytes]) -> Path:
    with tarfile.open(path, "w:gz" if path.name.endswith("gz") else "w") as archive:
        for name, data in files.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            archive.addfile(info, io.BytesIO(data))
    return path


def _run(name, download, out, **kwargs):
    return prepare(name, download, out, workers=1, progress=False, **kwargs)


def test_split_is_read_from_archive_and_folder_names():
    assert detect_split(Path("val2017.zip"), "val2017/a.jpg") == "val"
    assert detect_split(Path("coco.zip"), "train2017/a.jpg") == "train"
    assert detect_split(Path("ILSVRC2012_img_val.tar"), "x.JPEG") == "val"
    assert detect_split(Path("clic.zip"), "professional_valid_2020/x.png") == "val"
    assert detect_split(Path("clic.zip"), "train/validity.png") == "train"  # folders only
    assert detect_split(Path("openimages"), "validation/x.jpg") == "val"


def test_coco_zips_become_train_and_val_databases(tmp_path):
    out = tmp_path / "coco"
    train = {f"train2017/{i:012d}.jpg": image_bytes((70, 50), i, "JPEG") for i in range(5)}
    train["train2017/broken.jpg"] = b"\xff\xd8 not a jpeg"
    _run("coco", _zip(tmp_path / "train2017.zip", train), out)
    val = {f"val2017/{i:012d}.jpg": image_bytes((60, 60), 10 + i, "JPEG") for i in range(2)}
    reports = _run("coco", _zip(tmp_path / "val2017.zip", val), out)
    assert set(reports) == {"val"} and reports["val"].count == 2
    meta = read_metadata(out / "train")
    assert meta["count"] == 5 and [s["key"] for s in meta["skipped"]] == ["train2017/broken.jpg"]
    assert LmdbSource(out / "train").read_bytes(0) == train["train2017/000000000000.jpg"]
    data = LmdbDataModule(str(out), crop=32, val_crop=32, batch_size=2)
    data.setup("fit")
    assert next(iter(data.train_dataloader())).shape == (2, 3, 32, 32)
    assert data.test_names == ["val2017/000000000000.jpg", "val2017/000000000001.jpg"]


def test_imagenet_tar_of_class_tars_and_flat_val_tar(tmp_path):
    classes = {
        f"{wnid}.tar": _tar(
            tmp_path / f"{wnid}.tar",
            {f"{wnid}_{i}.JPEG": image_bytes((48, 40), i, "JPEG") for i in range(2)},
        ).read_bytes()
        for wnid in ("n01440764", "n01443537")
    }
    out = tmp_path / "imagenet"
    _run("imagenet", _tar(tmp_path / "ILSVRC2012_img_train.tar", classes), out)
    assert LmdbSource(out / "train").names == [
        "n01440764/n01440764_0.JPEG",
        "n01440764/n01440764_1.JPEG",
        "n01443537/n01443537_0.JPEG",
        "n01443537/n01443537_1.JPEG",
    ]
    val = {f"ILSVRC2012_val_{i:08d}.JPEG": image_bytes((40, 40), i, "JPEG") for i in (1, 2)}
    _run("imagenet", _tar(tmp_path / "ILSVRC2012_img_val.tar.gz", val), out)
    assert read_metadata(out / "val")["count"] == 2


def test_clic_folder_and_large_images_filter(tmp_path):
    clic = tmp_path / "download"
    for i in range(3):
        write_image(clic / "train" / f"t{i}.png", (90, 64))
    write_image(clic / "valid" / "v0.png", (64, 80))
    (clic / "train" / "readme.txt").write_text("ignored: not an image name")
    reports = _run("clic", clic, tmp_path / "clic")
    assert (reports["train"].count, reports["val"].count) == (3, 1)

    write_image(clic / "train" / "big.png", (520, 512))
    write_image(clic / "train" / "wide.png", (700, 300))
    reports = _run("large_images", clic, tmp_path / "large")
    assert LmdbSource(tmp_path / "large" / "train").names == ["train/big.png"]
    reasons = " ".join(s["reason"] for s in reports["train"].skipped)
    assert "700x300 is smaller than the minimum size 512" in reasons


def test_qvrf_keeps_the_largest_images_and_halves_those_over_512(tmp_path, capsys):
    from PIL import Image

    from src.datamodules.prepare import halve_large

    download = tmp_path / "imagenet"
    sizes = {"a.png": (700, 600), "b.jpg": (1025, 513), "c.png": (900, 500), "d.png": (100, 80)}
    for name, size in sizes.items():
        write_image(download / "n01" / name, size)
    out = tmp_path / "qvrf"
    args = ["qvrf", str(download), str(out), "--largest", "3", "--split", "train", "--workers", "1"]
    assert main(args) == 0
    source = LmdbSource(out / "train")
    kept = dict(zip(source.names, source.sizes(range(len(source.names)))))
    # by pixels: b, c, a; a and b have a shorter side over 512 and are halved, c (500) is not
    assert kept == {"n01/a.png": (350, 300), "n01/b.jpg": (512, 256), "n01/c.png": (900, 500)}
    assert "next: python train.py data=qvrf" in capsys.readouterr().out
    original = Image.open(download / "n01" / "c.png").convert("RGB")
    assert np.array_equal(np.asarray(Image.open(io.BytesIO(source.read_bytes(2)))), original)
    # the halving is bicubic (a = -0.75): a linear ramp stays a ramp, sampled at pixel centres
    ramp = np.tile(np.arange(0, 1200, 1, dtype=np.float64) / 1200 * 255, (600, 1))
    img = Image.fromarray(np.stack([ramp] * 3, -1).round().astype(np.uint8))
    half = np.asarray(halve_large(img), dtype=np.float64)
    assert half.shape == (300, 600, 3)
    centres = (np.arange(600) * 2 + 0.5) / 1200 * 255
    assert np.abs(half[150, 2:-2, 0] - centres[2:-2]).max() <= 1.0
    assert halve_large(original) is original
    with pytest.raises(ConfigError, match="--largest 0"):
        prepare("qvrf", download, out, largest=0)


def test_celeba_faces_become_64_pixel_squares_in_the_official_partition(tmp_path):
    folder = tmp_path / "img_align_celeba"
    for i in (1, 2, 3, 4):
        write_image(folder / f"{i:06d}.jpg", (178, 218))
    (tmp_path / "list_eval_partition.txt").write_text(
        "000001.jpg 0\n000002.jpg 0\n000003.jpg 1\n000004.jpg 2\n"
    )
    out = tmp_path / "celeba"
    reports = _run("celeba", folder, out)
    assert {s: r.count for s, r in reports.items()} == {"train": 2, "val": 1, "test": 1}
    source = LmdbSource(out / "train")
    assert source.names == ["000001.jpg", "000002.jpg"] and source.sizes([0]) == [(64, 64)]
    assert decode_rgb(source.read_bytes(0)).shape == (3, 64, 64)
    zipped = {
        f"img_align_celeba/{n:06d}.jpg": image_bytes((178, 218), n, "JPEG") for n in (5, 162771)
    }
    (tmp_path / "sub").mkdir()  # no partition file beside this zip
    reports = _run("celeba", _zip(tmp_path / "sub" / "celeba.zip", zipped), tmp_path / "zipped")
    assert reports["train"].count == 1 and reports["val"].count == 1  # CelebA's own numbering
    with pytest.raises(DataError, match="img_align_celeba folder or its zip"):
        _run("celeba", tmp_path / "nothing.tar", out)


def _batch(rows: np.ndarray, key: str = "data") -> bytes:
    return pickle.dumps({key.encode(): rows, b"labels": list(range(len(rows)))})


def test_cifar10_pickled_batches_become_exact_pngs(tmp_path):
    rng = np.random.default_rng(0)
    files = {"cifar-10-batches-py/batches.meta": pickle.dumps({b"label_names": []})}
    batches = {}
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        batches[name] = rng.integers(0, 256, (3, 3072), dtype=np.uint8)
        files[f"cifar-10-batches-py/{name}"] = _batch(batches[name])
    out = tmp_path / "cifar10"
    _run("cifar10", _tar(tmp_path / "cifar-10-python.tar.gz", files), out)
    train, val = LmdbSource(out / "train"), LmdbSource(out / "val")
    assert len(train) == 15 and len(val) == 3 and val.names[0] == "test_batch/000000.png"
    expected = batches["test_batch"][1].reshape(3, 32, 32)
    assert np.array_equal(decode_rgb(val.read_bytes(1)).numpy(), expected)  # lossless


def test_imagenet32_npz_batches_and_hostile_pickles(tmp_path):
    rng = np.random.default_rng(1)
    arrays = {"train_data_batch_1": rng.integers(0, 256, (4, 3072), dtype=np.uint8)}
    arrays["val_data"] = rng.integers(0, 256, (2, 3072), dtype=np.uint8)
    files = {}
    for name, rows in arrays.items():
        buf = io.BytesIO()
        np.savez(buf, data=rows, labels=np.arange(len(rows)))
        files[f"Imagenet32/{name}.npz"] = buf.getvalue()
    reports = _run("imagenet32", _zip(tmp_path / "Imagenet32.zip", files), tmp_path / "i32")
    assert (reports["train"].count, reports["val"].count) == (4, 2)

    class Hostile:
        def __reduce__(self):
            return (print, ("this must never run",))

    hostile = _zip(tmp_path / "bad.zip", {"data_batch_1": pickle.dumps({b"data": Hostile()})})
    with pytest.raises(DataError, match="refusing to unpickle builtins.print"):
        _run("cifar10", hostile, tmp_path / "bad")
    with pytest.raises(DataError, match="no data_batch_"):
        _run("cifar10", _zip(tmp_path / "empty.zip", {"x.txt": b""}), tmp_path / "empty")


def test_kodak_is_a_test_only_folder(tmp_path, capsys):
    download = tmp_path / "download"
    for i in (1, 2):
        write_image(download / f"kodim{i:02d}.png", (96, 64))
    write_image(download / "thumbnail.png", (10, 10))
    assert main(["kodak", str(download), str(tmp_path / "kodak"), "--workers", "1"]) == 0
    out = capsys.readouterr().out
    assert "found 2 of Kodak's 24 images" in out and f"data.root={tmp_path / 'kodak'}" in out
    assert sorted(p.name for p in (tmp_path / "kodak").iterdir()) == ["kodim01.png", "kodim02.png"]
    data = EvaluationFolderDataModule(str(tmp_path / "kodak"), pattern="kodim*.png", val_crop=32)
    data.setup("test")
    assert data.test_names == ["kodim01.png", "kodim02.png"]
    assert [x.shape for x in data.test_dataloader()] == [(1, 3, 64, 96)] * 2
    with pytest.raises(ConfigError, match="is a test set"):
        data.setup("fit")
    with pytest.raises(ConfigError, match="no preparer 'mnist'"):
        prepare("mnist", download)


def _compose(tmp_path: Path, *overrides: str):
    """The train config for a data preset (conftest's helper sets data.root, which these lack)."""
    GlobalHydra.instance().clear()
    base = [
        f"paths.data_dir={tmp_path}/data",
        f"paths.log_dir={tmp_path}/logs",
        f"hydra.run.dir={tmp_path}/run",
    ]
    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        cfg = compose("train", overrides=base + list(overrides), return_hydra_config=True)
    HydraConfig.instance().set_config(cfg)
    with open_dict(cfg):
        cfg.paths.output_dir = str(tmp_path / "run")
    GlobalHydra.instance().clear()
    return cfg


@pytest.mark.parametrize("preset", PRESETS)
def test_every_data_preset_composes_with_the_papers_crop(tmp_path, preset):
    overrides = [f"data={preset}"] + (["data.root=/x"] if preset == "folder" else [])
    overrides += ["data.path=/x"] if preset == "lmdb" else []
    cfg = _compose(tmp_path, *overrides)
    module = hydra.utils.instantiate(cfg.data)
    assert isinstance(module, CropDataModule)
    paper = {"coco": 256, "openimages": 256, "celeba": 64, "cifar10": 32, "imagenet32": 32}
    assert module.crop == paper.get(preset, 512 if preset == "large_images" else 256)
    if preset not in ("folder", "lmdb", "sample"):
        location = str(getattr(module, "path", getattr(module, "root", "")))
        assert location == f"{tmp_path}/data/{preset}"
    if preset == "large_images":
        assert (module.min_size, module.small_images) == (512, "skip")


@pytest.mark.slow
def test_prepared_preset_trains_and_kodak_evaluates(tmp_path):
    data = tmp_path / "data"
    files = {f"train2017/{i}.jpg": image_bytes((80, 72), i, "JPEG") for i in range(6)}
    files |= {f"val2017/{i}.jpg": image_bytes((72, 72), 50 + i, "JPEG") for i in range(2)}
    _run("coco", _zip(tmp_path / "coco.zip", files), data / "coco")
    for i in (1, 2):
        write_image(data / "kodak" / f"kodim{i:02d}.png", (64, 64))
    cfg = _compose(
        tmp_path,
        "data=coco",
        "model.codec.N=8",
        "data.crop=64",
        "data.val_crop=64",
        "data.batch_size=2",
        "data.num_workers=0",
        "trainer.max_steps=2",
        "trainer.max_time=null",
        "callbacks.model_summary=null",
        "logger=csv",
    )
    train(cfg)
    ckpt = next((tmp_path / "run").rglob("last.ckpt"))
    proc = run_script(
        "evaluate.py",
        [f"ckpt={ckpt}", "data=kodak", f"paths.data_dir={data}", f"paths.log_dir={tmp_path}/logs"],
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = next((tmp_path / "logs" / "evaluate").rglob("*.csv")).read_text()
    assert "kodim01.png" in rows and "kodim02.png" in rows
