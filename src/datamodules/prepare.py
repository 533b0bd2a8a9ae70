"""Turn what people download into what a data preset reads, in one command.

    python -m src.datamodules.prepare NAME DOWNLOAD [OUT] [--split train|val] [--workers N]

OUT defaults to `data/NAME`, which is `${paths.data_dir}/NAME` when train.py runs from the same
folder; then `python train.py data=NAME` trains on it. DOWNLOAD is a folder, a zip, or a tar
(.tar, .tar.gz, .tgz, .tar.bz2, .tar.xz; read as a stream, once, never extracted to disk).

- openimages, imagenet, coco, clic, large_images: any images in DOWNLOAD become LMDB databases
  OUT/train and OUT/val. An image goes to val when the archive's name or one of its folders says
  so (val, valid, validation, test: COCO's val2017, CLIC's valid, ImageNet's ILSVRC2012_img_val),
  to train otherwise; `--split` forces one. Run once per download (train and val archives); tars
  inside the download (ImageNet's per-class tars) are read too. large_images keeps only images of
  at least 512 x 512 (McQuic's filter). `--largest N` keeps the N images with the most pixels
  (read from their headers in a first pass over the download, ties by name).
- qvrf: QVRF's training set, as above, each image whose shorter side exceeds 512 halved by
  bicubic interpolation (as OpenCV's INTER_CUBIC, which the authors used): run it on ImageNet's
  train tar with `--largest 8000` and on CLIC 2020's professional train zip, both `--split train`.
- celeba: `img_align_celeba` (folder or zip). Each 178 x 218 face is centre-cropped to 148 x 148
  and resized to 64 x 64 (Lanczos), stored as PNG; the official partition (list_eval_partition.txt
  next to the images, else CelebA's fixed numbering) gives train, val and test.
- cifar10: `cifar-10-python.tar.gz` or its `cifar-10-batches-py` folder (data_batch_1..5 to train,
  test_batch to val). imagenet32: `Imagenet32_train.zip` / `Imagenet32_val.zip` or their folders
  (train_data_batch_* and val_data, pickled or .npz). Each 32 x 32 image is stored as PNG.
- kodak: kodim01.png ... kodim24.png (folder or archive) copied into OUT as a test-only folder.
"""

from __future__ import annotations

import argparse
import heapq
import io
import pickle
import re
import shutil
import sys
import tarfile
import zipfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from rich.console import Console

from src.datamodules.images import IMAGE_SUFFIXES, open_rgb
from src.datamodules.lmdb import BuildReport, Payload, build_lmdbs, print_build_report
from src.errors import ConfigError, DataError

Member = tuple[str, Callable[[], Payload]]  # a path inside the download and its content

_TAR_SUFFIXES = (".tar", ".tar.gz", ".tgz", ".tar.bz2", ".tbz2", ".tar.xz", ".txz")
_VAL_WORD = re.compile(r"(^|[^a-z])(val|valid|validation|test)([^a-z]|$)")
_IGNORED = ("__MACOSX", ".DS_Store")


# -- reading a download ---------------------------------------------------------------------


def _is_tar(name: str) -> bool:
    return name.lower().endswith(_TAR_SUFFIXES)


def _archive_stem(name: str) -> str:
    lower = name.lower()
    for suffix in (*_TAR_SUFFIXES, ".zip"):
        if lower.endswith(suffix):
            return name[: -len(suffix)]
    return name


def _tar_members(stream: tarfile.TarFile, prefix: str) -> Iterator[Member]:
    """Members of a tar read as a stream; a getter must run before the next member is read."""
    for member in stream:
        if not member.isfile():
            continue
        name = prefix + member.name.lstrip("./")
        if _is_tar(member.name):  # e.g. ImageNet's train tar of per-class tars
            inner = stream.extractfile(member)
            with tarfile.open(fileobj=inner, mode="r|*") as nested:
                yield from _tar_members(nested, f"{_archive_stem(name)}/")
            continue
        yield name, lambda m=member: stream.extractfile(m).read()


def read_download(path: str | Path) -> Iterator[Member]:
    """Every file in a folder, zip or tar, as (posix path inside it, content getter).

    Folder contents are handed on as paths (the builder's workers read them); zip and tar members
    as bytes. Zip and folder members come in sorted order; a tar's in its own order.
    """
    path = Path(path)
    if path.is_dir():
        for file in sorted(p for p in path.rglob("*") if p.is_file()):
            rel = file.relative_to(path).as_posix()
            if not any(part in _IGNORED for part in rel.split("/")):
                yield rel, lambda f=file: f
    elif zipfile.is_zipfile(path):
        with zipfile.ZipFile(path) as archive:
            for info in sorted(archive.infolist(), key=lambda i: i.filename):
                if not info.is_dir() and not any(p in _IGNORED for p in info.filename.split("/")):
                    yield info.filename, lambda i=info: archive.read(i)
    elif path.is_file() and tarfile.is_tarfile(path):
        with tarfile.open(path, mode="r|*") as stream:
            yield from _tar_members(stream, "")
    elif not path.exists():
        raise DataError(f"{path} does not exist")
    else:
        raise DataError(f"{path} is not a folder, a zip or a tar")


def detect_split(download: Path, name: str) -> str:
    """ "val" when the download's name or a folder on the way says so, else "train"."""
    words = [_archive_stem(download.name), *PurePosixPath(name).parts[:-1]]
    return "val" if any(_VAL_WORD.search(w.lower()) for w in words) else "train"


def _is_image(name: str) -> bool:
    return PurePosixPath(name).suffix.lower() in IMAGE_SUFFIXES


def _content_bytes(get: Callable[[], Payload]) -> bytes:
    content = get()
    return content.read_bytes() if isinstance(content, Path) else content


# -- the preparers --------------------------------------------------------------------------


@dataclass
class Options:
    """What the command line passes to a preparer."""

    download: Path
    out: Path
    split: str | None = None
    workers: int | None = None
    min_size: int | None = None
    largest: int | None = None
    progress: bool = True


def _build(items, opts: Options, min_size: int = 0, transform=None) -> dict[str, BuildReport]:
    splits = ("train", "val", "test")
    return build_lmdbs(
        items,
        {s: opts.out / s for s in splits},
        source=str(opts.download.resolve()),
        min_size=min_size if opts.min_size is None else opts.min_size,
        workers=opts.workers,
        transform=transform,
        progress=opts.progress,
    )


def largest_images(download: Path, n: int) -> set[str]:
    """The names of the `n` images of a download with the most pixels (ties by name), from their
    headers; files that do not open are left to the builder to report."""
    if n <= 0:
        raise ConfigError(f"--largest {n}: give a positive number of images")
    sizes = []
    for name, get in read_download(download):
        if not _is_image(name):
            continue
        content = get()
        try:
            with Image.open(content if isinstance(content, Path) else io.BytesIO(content)) as img:
                width, height = img.size
        except (OSError, ValueError, Image.DecompressionBombError):
            continue
        sizes.append((-width * height, name))
    return {name for _, name in heapq.nsmallest(n, sizes)}


def prepare_images(opts: Options, min_size: int = 0, transform=None) -> dict[str, BuildReport]:
    """Images from a folder or archive into OUT/train and OUT/val (see the module docstring)."""
    keep = None if opts.largest is None else largest_images(opts.download, opts.largest)
    items = (
        (opts.split or detect_split(opts.download, name), name, get)
        for name, get in read_download(opts.download)
        if _is_image(name) and (keep is None or name in keep)
    )
    return _build(items, opts, min_size, transform)


QVRF_HALVE_ABOVE = 512


def halve_large(img: Image.Image) -> Image.Image:
    """QVRF's preprocessing: an image whose shorter side exceeds 512 is halved (each side floor
    divided by 2) by bicubic interpolation without antialiasing (a = -0.75, half-pixel centres,
    as OpenCV's INTER_CUBIC); smaller images are kept as they are."""
    width, height = img.size
    if min(width, height) <= QVRF_HALVE_ABOVE:
        return img
    pixels = torch.from_numpy(np.asarray(img.convert("RGB"), dtype=np.float32)).permute(2, 0, 1)
    half = F.interpolate(
        pixels.unsqueeze(0), size=(height // 2, width // 2), mode="bicubic", align_corners=False
    )
    out = half[0].round().clamp(0, 255).to(torch.uint8).permute(1, 2, 0).numpy()
    return Image.fromarray(out)


def celeba_face_64(img: Image.Image) -> Image.Image:
    """CelebA's aligned face: the centre 148 x 148 of the 178 x 218 image, resized to 64 x 64."""
    w, h = img.size
    side = min(148, w, h)
    left, top = (w - side) // 2, (h - side) // 2
    face = img.crop((left, top, left + side, top + side))
    return face.resize((64, 64), Image.Resampling.LANCZOS)


# CelebA's official partition by image number when list_eval_partition.txt is not at hand.
_CELEBA_LAST_TRAIN, _CELEBA_LAST_VAL = 162770, 182637
_CELEBA_SPLITS = {"0": "train", "1": "val", "2": "test"}


def _celeba_partition(opts: Options) -> dict[str, str]:
    """Image file name -> split, from list_eval_partition.txt in the download or beside it."""
    text = None
    for name, get in read_download(opts.download):
        if PurePosixPath(name).name == "list_eval_partition.txt":
            text = _content_bytes(get).decode()
    beside = opts.download.parent / "list_eval_partition.txt"
    if text is None and beside.is_file():
        text = beside.read_text()
    if text is None:
        return {}
    pairs = (line.split() for line in text.splitlines() if line.strip())
    return {file: _CELEBA_SPLITS[part] for file, part in pairs}


def _celeba_default_split(file: str) -> str:
    number = int(re.sub(r"\D", "", PurePosixPath(file).stem) or 0)
    if number <= _CELEBA_LAST_TRAIN:
        return "train"
    return "val" if number <= _CELEBA_LAST_VAL else "test"


def prepare_celeba(opts: Options) -> dict[str, BuildReport]:
    """CelebA's img_align_celeba as 64 x 64 faces in OUT/{train,val,test}."""
    if not (opts.download.is_dir() or zipfile.is_zipfile(opts.download)):
        raise DataError(f"{opts.download}: give CelebA's img_align_celeba folder or its zip")
    partition = _celeba_partition(opts)  # a zip or folder: reading it twice is cheap
    items = (
        (opts.split or partition.get(file) or _celeba_default_split(file), file, get)
        for name, get in read_download(opts.download)
        if _is_image(name)
        for file in [PurePosixPath(name).name]
    )
    return _build(items, opts, transform=celeba_face_64)


class _ArraysOnly(pickle.Unpickler):
    """Unpickles dicts, lists, bytes and numpy arrays only: a downloaded pickle runs no code."""

    ALLOWED = {
        ("numpy.core.multiarray", "_reconstruct"),
        ("numpy._core.multiarray", "_reconstruct"),
        ("numpy", "ndarray"),
        ("numpy", "dtype"),
        ("numpy.core.multiarray", "scalar"),
        ("numpy._core.multiarray", "scalar"),
        ("_codecs", "encode"),
    }

    def find_class(self, module: str, name: str):
        if (module, name) not in self.ALLOWED:
            raise DataError(f"refusing to unpickle {module}.{name} from a dataset batch")
        return super().find_class(module, name)


def _load_batch(name: str, content: bytes) -> np.ndarray:
    """The (N, 32, 32, 3) uint8 images of one CIFAR / ImageNet32 batch (pickle or .npz)."""
    if name.endswith(".npz"):
        with np.load(io.BytesIO(content), allow_pickle=False) as npz:
            data = npz["data"]
    else:
        batch = _ArraysOnly(io.BytesIO(content), encoding="bytes").load()
        data = batch.get(b"data", batch.get("data"))
    data = np.asarray(data, dtype=np.uint8)
    side = int(round((data.shape[1] / 3) ** 0.5))
    if data.ndim != 2 or 3 * side * side != data.shape[1]:
        raise DataError(f"{name}: expected rows of 3 x side x side bytes, got {data.shape}")
    return data.reshape(-1, 3, side, side).transpose(0, 2, 3, 1)


_BATCH_SPLITS = (
    (re.compile(r"^(data_batch_\d+|train_data_batch_\d+)(\.npz)?$"), "train"),
    (re.compile(r"^(test_batch|val_data)(\.npz)?$"), "val"),
)


def prepare_batches(opts: Options) -> dict[str, BuildReport]:
    """CIFAR-10 / ImageNet32 pickled (or .npz) batches as 32 x 32 PNGs in OUT/{train,val}."""
    found: list[str] = []

    def items() -> Iterator[tuple]:
        for name, get in read_download(opts.download):
            stem = PurePosixPath(name).name
            split = next((s for pattern, s in _BATCH_SPLITS if pattern.match(stem)), None)
            if split is None:
                continue
            found.append(stem)
            images = _load_batch(name, _content_bytes(get))
            batch = stem.removesuffix(".npz")
            for i, pixels in enumerate(images):
                yield opts.split or split, f"{batch}/{i:06d}.png", lambda p=pixels: p

    reports = _build(items(), opts)
    if not found:
        raise DataError(
            f"no data_batch_* / test_batch / train_data_batch_* / val_data files in {opts.download}"
        )
    return reports


KODAK_COUNT = 24


def prepare_kodak(opts: Options) -> dict[str, BuildReport]:
    """kodim01.png ... kodim24.png into the folder OUT (each decoded once to check it)."""
    opts.out.mkdir(parents=True, exist_ok=True)
    copied = []
    for name, get in read_download(opts.download):
        file = PurePosixPath(name).name
        if not re.fullmatch(r"kodim\d\d\.png", file):
            continue
        content = get()
        target = opts.out / file
        if isinstance(content, Path):
            shutil.copyfile(content, target)
        else:
            target.write_bytes(content)
        open_rgb(target)
        copied.append(file)
    if not copied:
        raise DataError(f"no kodimNN.png files in {opts.download}")
    report = BuildReport(path=opts.out, added=len(copied), count=len(copied))
    report.total_bytes = sum((opts.out / f).stat().st_size for f in copied)
    if len(copied) != KODAK_COUNT:
        report.skipped.append(
            {"key": "kodak", "reason": f"found {len(copied)} of Kodak's {KODAK_COUNT} images"}
        )
    return {"test": report}


PREPARERS: dict[str, Callable[[Options], dict[str, BuildReport]]] = {
    "openimages": prepare_images,
    "imagenet": prepare_images,
    "coco": prepare_images,
    "clic": prepare_images,
    "large_images": lambda opts: prepare_images(opts, min_size=512),
    "qvrf": lambda opts: prepare_images(opts, transform=halve_large),
    "celeba": prepare_celeba,
    "cifar10": prepare_batches,
    "imagenet32": prepare_batches,
    "kodak": prepare_kodak,
}


def prepare(
    name: str, download: str | Path, out: str | Path | None = None, **options
) -> dict[str, BuildReport]:
    """Run the preparer `name` (see `PREPARERS`); `options` are `Options` fields."""
    if name not in PREPARERS:
        raise ConfigError(f"no preparer {name!r}; choose one of {', '.join(PREPARERS)}")
    opts = Options(Path(download), Path(out) if out else Path("data") / name, **options)
    if opts.split not in (None, "train", "val", "test"):
        raise ConfigError(f"--split {opts.split}: choose train, val or test")
    return PREPARERS[name](opts)


def main(argv: list[str] | None = None) -> int:
    """The `python -m src.datamodules.prepare` command line."""
    parser = argparse.ArgumentParser(
        prog="python -m src.datamodules.prepare", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument("name", choices=sorted(PREPARERS))
    parser.add_argument("download", type=Path, help="the folder, zip or tar you downloaded")
    parser.add_argument("out", type=Path, nargs="?", help="default: data/NAME")
    parser.add_argument("--split", choices=("train", "val", "test"), help="force every image here")
    parser.add_argument("--workers", type=int, help="decoding processes (default: all cores)")
    parser.add_argument("--min-size", type=int, help="override the preset's minimum image side")
    parser.add_argument(
        "--largest", type=int, metavar="N", help="keep only the N images with the most pixels"
    )
    args = parser.parse_args(argv)
    console = Console()
    try:
        reports = prepare(
            args.name,
            args.download,
            args.out,
            split=args.split,
            workers=args.workers,
            min_size=args.min_size,
            largest=args.largest,
        )
    except (DataError, ConfigError) as err:
        console.print(f"[red]error:[/red] {err}")
        return 2
    for report in reports.values():
        print_build_report(report, console)
    out = args.out or Path("data") / args.name
    kodak = args.name == "kodak"
    where = "" if out == Path("data") / args.name else f" data.{'root' if kodak else 'path'}={out}"
    verb = "evaluate.py ckpt=CKPT" if kodak else "train.py"
    console.print(f"next: python {verb} data={args.name}{where}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
