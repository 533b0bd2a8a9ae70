"""LMDB image datasets: the builder, its command line, and the reader and DataModule.

    python -m src.datamodules.lmdb build SRC OUT [--min-size 256] [--workers N]   (or lic-lmdb)
    python -m src.datamodules.lmdb verify OUT
    python -m src.datamodules.lmdb info OUT

A database is a folder with `data.mdb`, `lock.mdb` and `metadata.json`. Each image is stored as
its original encoded bytes (never re-encoded) under a stable key, its path relative to SRC, so
the key order is the order `list_images` gives the folder. Named sub-databases: `images`
(key -> bytes), `sizes` (key -> JSON [width, height, bytes] of the upright image) and `build`
(the build settings, checked when a build resumes). `metadata.json` is written when a build
completes: format, count, total bytes, source, the filter, every image's size and the skipped
files with their reasons.

Every file is fully decoded by a worker before it is stored, so a corrupt, truncated, non-image,
oversized or too-small file is skipped and reported, never stored and never fatal. The builder
commits in batches; an interrupted build keeps what it committed and the same command resumes it,
ending with the same database as an uninterrupted build.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import logging
import multiprocessing
import multiprocessing.pool
import os
import statistics
import sys
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import lmdb
import numpy as np
from PIL import Image
from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from torch import Tensor

from src.datamodules.datasets import ImageSource, Size
from src.datamodules.folder import ImageFolderDataModule
from src.datamodules.images import IMAGE_SUFFIXES, MAX_PIXELS, decode_rgb, list_images, open_rgb
from src.errors import ConfigError, DataError

log = logging.getLogger(__name__)

FORMAT = "lic-lmdb"
VERSION = 1
METADATA = "metadata.json"
_IMAGES, _SIZES, _BUILD = b"images", b"sizes", b"build"
_MAX_KEY_BYTES = 511  # LMDB's default key limit
_COMMIT_ENTRIES = 256
_COMMIT_BYTES = 64 * 2**20

# What a builder item yields when asked: a file to read, encoded bytes, or (H, W, 3) uint8 pixels.
Payload = Path | bytes | np.ndarray
Item = tuple[str, Callable[[], Payload]]
Transform = Callable[[Image.Image], Image.Image]


def is_lmdb(path: str | Path) -> bool:
    """Whether `path` is a folder holding an LMDB database."""
    return (Path(path) / "data.mdb").is_file()


def read_metadata(path: str | Path) -> dict:
    """The `metadata.json` of a finished build; `DataError` if there is none."""
    path = Path(path)
    meta_path = path / METADATA
    if not meta_path.is_file():
        hint = "the build did not finish: run the same build command again to complete it"
        raise DataError(f"{meta_path} is missing; " + (hint if is_lmdb(path) else "no LMDB here"))
    meta = json.loads(meta_path.read_text())
    if meta.get("format") != FORMAT:
        raise DataError(f"{meta_path} was not written by the lic-lmdb builder")
    return meta


# -- building -------------------------------------------------------------------------------


@dataclass
class BuildReport:
    """What a build did: entries added now, found from an earlier run, and files skipped."""

    path: Path
    added: int = 0
    existing: int = 0
    skipped: list[dict] = field(default_factory=list)
    count: int = 0
    total_bytes: int = 0


def encode_png(img: Image.Image) -> bytes:
    """Lossless PNG bytes of an image (for images the builder creates or transforms)."""
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def _inspect(task: tuple[str, str, Payload, int, int, Transform | None]) -> tuple[str, tuple]:
    """Worker: (split, ("ok", key, bytes, width, height)) for a storable image, else
    (split, ("skip", key, why))."""
    split, key, payload, min_size, max_pixels, transform = task
    return split, _check(key, payload, min_size, max_pixels, transform)


def _check(
    key: str, payload: Payload, min_size: int, max_pixels: int, transform: Transform | None
) -> tuple:
    """Decode (or encode) one image and decide whether it is stored; see `_inspect`."""
    try:
        if isinstance(payload, np.ndarray):
            img, data = Image.fromarray(payload), None
        else:
            data = payload.read_bytes() if isinstance(payload, Path) else payload
            img = open_rgb(data, name=key, max_pixels=max_pixels)
        if transform is not None:
            img = transform(img)
        if data is None or transform is not None:
            data = encode_png(img)
    except DataError as err:
        return ("skip", key, str(err))
    except OSError as err:
        return ("skip", key, f"{key}: cannot be read ({err})")
    w, h = img.size
    if min(w, h) < min_size:
        return ("skip", key, f"{key}: {w}x{h} is smaller than the minimum size {min_size}")
    return ("ok", key, data, w, h)


def worker_pool(workers: int) -> contextlib.AbstractContextManager:
    """A process pool of `workers` (forked before any progress-bar thread starts), or nothing
    for 1 worker, in which case `bounded_map` runs inline."""
    if workers <= 1:
        return contextlib.nullcontext()
    return multiprocessing.get_context("fork").Pool(workers)


def bounded_map(
    fn: Callable, tasks: Iterable, pool: multiprocessing.pool.Pool | None, window: int = 64
) -> Iterator:
    """`fn` over `tasks` in order on `pool` (inline if None), reading ahead at most `window`
    tasks so a huge task stream (a tar of a million images) never fills memory."""
    if pool is None:
        yield from map(fn, tasks)
        return
    pending: deque = deque()
    for task in tasks:
        pending.append(pool.apply_async(fn, (task,)))
        while len(pending) >= window or (pending and pending[0].ready()):
            yield pending.popleft().get()
    while pending:
        yield pending.popleft().get()


def folder_items(src: str | Path) -> tuple[list[Item], int]:
    """Builder items for every image file under `src` (recursive), keyed by relative path."""
    src = Path(src)
    paths = list_images(src)
    return [(p.relative_to(src).as_posix(), lambda p=p: p) for p in paths], len(paths)


def _progress(enabled: bool) -> Progress:
    return Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        disable=not enabled,
        transient=False,
    )


class _Writer:
    """Batched LMDB writes that grow the map when it fills."""

    def __init__(self, env: lmdb.Environment) -> None:
        self.env = env
        self.images = env.open_db(_IMAGES)
        self.sizes = env.open_db(_SIZES)
        self.batch: list[tuple[bytes, bytes, bytes]] = []
        self.batch_bytes = 0

    def add(self, key: str, data: bytes, w: int, h: int) -> None:
        self.batch.append((key.encode(), data, json.dumps([w, h, len(data)]).encode()))
        self.batch_bytes += len(data)
        if len(self.batch) >= _COMMIT_ENTRIES or self.batch_bytes >= _COMMIT_BYTES:
            self.flush()

    def flush(self) -> None:
        while self.batch:
            try:
                with self.env.begin(write=True) as txn:
                    for key, data, size in self.batch:
                        txn.put(key, data, db=self.images)
                        txn.put(key, size, db=self.sizes)
            except lmdb.MapFullError:
                self.env.set_mapsize(self.env.info()["map_size"] * 2)
                continue
            self.batch, self.batch_bytes = [], 0


class _Database:
    """One database being built: its settings check, the keys it holds, its batched writer."""

    def __init__(self, out: Path, settings: dict) -> None:
        out.mkdir(parents=True, exist_ok=True)
        close_reader(out)
        self.out = out
        self.env = lmdb.open(str(out), map_size=2**30, subdir=True, max_dbs=4)
        self.writer = _Writer(self.env)
        build_db = self.env.open_db(_BUILD)
        with self.env.begin(write=True) as txn:
            stored = txn.get(b"settings", db=build_db)
            if stored is None:
                txn.put(b"settings", json.dumps(settings).encode(), db=build_db)
            elif json.loads(stored) != settings:
                before = json.loads(stored)
                diff = ", ".join(
                    f"{k}={before.get(k)!r}, not {v!r}"
                    for k, v in settings.items()
                    if before.get(k) != v
                )
                self.env.close()
                raise ConfigError(
                    f"{out} was started with {diff}: build into a new folder, or repeat the "
                    "original settings to resume it"
                )
            cursor = txn.cursor(db=self.writer.sizes)
            self.existing = {bytes(k).decode() for k in cursor.iternext(values=False)}
        self.report = BuildReport(path=out, existing=len(self.existing))


def build_lmdbs(
    items: Iterable[tuple[str, str, Callable[[], Payload]]],
    outs: dict[str, Path],
    *,
    source: str,
    min_size: int = 0,
    workers: int | None = None,
    total: int | None = None,
    transform: Transform | None = None,
    max_pixels: int = MAX_PIXELS,
    progress: bool = True,
) -> dict[str, BuildReport]:
    """Store each (split, key, payload getter) item's image in the database `outs[split]`, in one
    pass over `items` (a tar is read once), resuming whatever earlier runs stored.

    A getter is only called for keys not stored yet. `transform` (a picklable function of a
    Pillow image) is applied after decoding and the result stored as PNG; the preparers use it
    (e.g. CelebA's 64 x 64 faces). A database is created when its first item arrives. Raises
    `ConfigError` when resuming with other settings than a database was started with.
    """
    settings = {
        "min_size": min_size,
        "max_pixels": max_pixels,
        "transform": None if transform is None else getattr(transform, "__name__", "custom"),
        "suffixes": list(IMAGE_SUFFIXES),
    }
    databases: dict[str, _Database] = {}

    def tasks() -> Iterator[tuple]:
        for split, key, get in items:
            if split not in databases:
                databases[split] = _Database(Path(outs[split]), settings)
            db = databases[split]
            if key in db.existing:
                bar.advance(task)
                continue
            if len(key.encode()) > _MAX_KEY_BYTES:
                db.report.skipped.append({"key": key, "reason": f"{key}: too long for a key"})
                continue
            yield (split, key, get(), min_size, max_pixels, transform)

    try:
        with worker_pool(workers or os.cpu_count() or 1) as pool, _progress(progress) as bar:
            task = bar.add_task(f"building {', '.join(map(str, outs.values()))}", total=total)
            try:
                for split, result in bounded_map(_inspect, tasks(), pool):
                    db = databases[split]
                    if result[0] == "ok":
                        db.writer.add(*result[1:])
                        db.report.added += 1
                    else:
                        db.report.skipped.append({"key": result[1], "reason": result[2]})
                    bar.advance(task)
            finally:
                for db in databases.values():  # what finished before an interruption is kept
                    db.writer.flush()
        for db in databases.values():
            meta = _write_metadata(db, source, settings)
            db.report.count, db.report.total_bytes = meta["count"], meta["total_bytes"]
    finally:
        for db in databases.values():
            db.env.close()
    return {split: db.report for split, db in databases.items()}


def build_lmdb(items: Iterable[Item], out: str | Path, **kwargs) -> BuildReport:
    """Store every (key, payload getter) item's image in the database at `out` (arguments:
    `build_lmdbs`'s); `DataError` if there is no item at all."""
    reports = build_lmdbs(((".", key, get) for key, get in items), {".": Path(out)}, **kwargs)
    if "." not in reports:
        raise DataError(f"no images to build {out} from")
    return reports["."]


def _write_metadata(db: _Database, source: str, settings: dict) -> dict:
    images = []
    with db.env.begin() as txn:
        for key, value in txn.cursor(db=db.writer.sizes):
            w, h, n = json.loads(bytes(value))
            images.append([bytes(key).decode(), w, h, n])
    meta = {
        "format": FORMAT,
        "version": VERSION,
        "count": len(images),
        "total_bytes": sum(e[3] for e in images),
        "source": source,
        "filter": settings,
        "images": images,
        "skipped": sorted(db.report.skipped, key=lambda s: s["key"]),
    }
    partial = db.out / f".{METADATA}.part"
    partial.write_text(json.dumps(meta))
    os.replace(partial, db.out / METADATA)
    return meta


# -- reading --------------------------------------------------------------------------------


_READERS: dict[tuple[int, Path], tuple[lmdb.Environment, object]] = {}


def _reader(path: Path) -> tuple[lmdb.Environment, object]:
    """This process's read-only handle on a database (LMDB allows one per process and path;
    handles must not cross a fork, hence the process id in the key)."""
    key = (os.getpid(), path.resolve())
    if key not in _READERS:
        env = lmdb.open(
            str(path), readonly=True, lock=False, readahead=False, meminit=False, max_dbs=4
        )
        _READERS[key] = (env, env.open_db(_IMAGES, create=False))
    return _READERS[key]


def _drop_inherited_readers() -> None:
    """In a forked child: close the parent's handles (unused here, and LMDB refuses to open a
    database a second time in a process that still holds one)."""
    for key in [k for k in _READERS if k[0] != os.getpid()]:
        _READERS.pop(key)[0].close()


os.register_at_fork(after_in_child=_drop_inherited_readers)


def close_reader(path: Path) -> None:
    """Close this process's read-only handle on a database, if any (before writing to it)."""
    reader = _READERS.pop((os.getpid(), Path(path).resolve()), None)
    if reader is not None:
        reader[0].close()


class LmdbSource(ImageSource):
    """The images of a built database, named by key. The database opens on first read in each
    process, so DataLoader workers each get their own handle."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        meta = read_metadata(self.path)
        self.names = [e[0] for e in meta["images"]]
        self._sizes: list[Size] = [(e[1], e[2]) for e in meta["images"]]

    def read_bytes(self, index: int) -> bytes:
        """The stored encoded bytes of one image."""
        env, db = _reader(self.path)
        with env.begin(db=db, buffers=False) as txn:
            data = txn.get(self.names[index].encode())
        if data is None:
            raise DataError(f"{self.path}: key {self.names[index]!r} is in metadata but not stored")
        return data

    def load(self, index: int) -> Tensor:
        return decode_rgb(self.read_bytes(index), name=f"{self.path}:{self.names[index]}")

    def sizes(self, indices) -> list[Size | None]:
        return [self._sizes[i] for i in indices]


class LmdbDataModule(ImageFolderDataModule):
    """Random crops + flips from LMDB databases (arguments: `CropDataModule`'s + `path`).

    `path` is one database (split into train and validation by a hash of the keys) or a folder
    holding `train` and `val` (or `valid`, `validation`, `test`) databases, as the preparers
    write them. It reads like a folder (`find_splits` opens databases too); this class only
    insists that the databases are there.
    """

    def __init__(self, path: str, **kwargs) -> None:
        super().__init__(root=path, **kwargs)

    def _splits(self) -> tuple[ImageSource, list[int], ImageSource | None, list[int]]:
        if not (is_lmdb(self.root) or is_lmdb(self.root / "train")):
            raise DataError(
                f"no LMDB database at {self.root} (nor at {self.root / 'train'}): build one with "
                f"`python -m src.datamodules.lmdb build IMAGES {self.root}` or a preparer "
                "(`python -m src.datamodules.prepare NAME DOWNLOAD`)"
            )
        return super()._splits()


# -- verify / info --------------------------------------------------------------------------


def _verify_one(task: tuple[str, bytes, int, int]) -> str | None:
    key, data, w, h = task
    try:
        img = open_rgb(data, name=key)
    except DataError as err:
        return str(err)
    if img.size != (w, h):
        return f"{key}: decodes to {img.size[0]}x{img.size[1]}, metadata says {w}x{h}"
    return None


def verify_lmdb(path: str | Path, workers: int | None = None, progress: bool = True) -> list[str]:
    """Decode every entry and check it against the metadata; returns the problems found."""
    path = Path(path)
    source = LmdbSource(path)
    problems = []
    env, db = _reader(path)
    with env.begin() as txn:
        stored = txn.stat(db)["entries"]
    if stored != len(source):
        problems.append(f"{path}: {stored} entries stored, {len(source)} in metadata")

    def tasks() -> Iterator[tuple]:
        for i, name in enumerate(source.names):
            try:
                data = source.read_bytes(i)
            except DataError as err:
                problems.append(str(err))
                continue
            yield (name, data, *source.sizes([i])[0])

    with worker_pool(workers or os.cpu_count() or 1) as pool, _progress(progress) as bar:
        task = bar.add_task(f"verifying {path.name}", total=len(source))
        for problem in bounded_map(_verify_one, tasks(), pool):
            if problem:
                problems.append(problem)
            bar.advance(task)
    close_reader(path)
    return problems


def summarize_lmdb(path: str | Path) -> dict:
    """Headline figures of a database: count, bytes, size range, small-image counts, filter."""
    meta = read_metadata(path)
    widths = [e[1] for e in meta["images"]]
    heights = [e[2] for e in meta["images"]]
    shorter = [min(w, h) for w, h in zip(widths, heights)]
    summary = {
        "path": str(path),
        "source": meta["source"],
        "count": meta["count"],
        "total_bytes": meta["total_bytes"],
        "skipped": len(meta["skipped"]),
        "min_size_filter": meta["filter"]["min_size"],
        "transform": meta["filter"]["transform"],
    }
    if shorter:
        summary |= {
            "width_min_median_max": [min(widths), statistics.median(widths), max(widths)],
            "height_min_median_max": [min(heights), statistics.median(heights), max(heights)],
            "megapixels": sum(w * h for w, h in zip(widths, heights)) / 1e6,
            **{f"shorter_side_below_{s}": sum(x < s for x in shorter) for s in (64, 256, 512)},
        }
    return summary


def main(argv: list[str] | None = None) -> int:
    """The `lic-lmdb` / `python -m src.datamodules.lmdb` command line."""
    parser = argparse.ArgumentParser(prog="lic-lmdb", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    build = sub.add_parser("build", help="pack the images under SRC into an LMDB at OUT")
    build.add_argument("src", type=Path)
    build.add_argument("out", type=Path)
    build.add_argument(
        "--min-size", type=int, default=0, help="skip images whose shorter side is below this"
    )
    build.add_argument(
        "--workers", type=int, default=None, help="decoding processes (default: all cores)"
    )
    verify = sub.add_parser("verify", help="decode every entry, check it against the metadata")
    verify.add_argument("out", type=Path)
    verify.add_argument("--workers", type=int, default=None, help="decoding processes")
    sub.add_parser("info", help="print a summary").add_argument("out", type=Path)
    args = parser.parse_args(argv)
    console = Console()
    try:
        if args.command == "build":
            items, total = folder_items(args.src)
            report = build_lmdb(
                items,
                args.out,
                source=str(args.src.resolve()),
                min_size=args.min_size,
                workers=args.workers,
                total=total,
            )
            print_build_report(report, console)
        elif args.command == "verify":
            problems = verify_lmdb(args.out, args.workers)
            for problem in problems:
                console.print(f"[red]{problem}")
            console.print(f"{args.out}: {'OK' if not problems else f'{len(problems)} problems'}")
            return 1 if problems else 0
        else:
            for key, value in summarize_lmdb(args.out).items():
                console.print(f"{key:>24}: {value}")
    except (DataError, ConfigError) as err:
        console.print(f"[red]error:[/red] {err}")
        return 2
    return 0


def print_build_report(report: BuildReport, console: Console, shown: int = 20) -> None:
    """The end-of-build summary: counts, and the skipped files with their reasons."""
    console.print(
        f"{report.path}: {report.count} images, {report.total_bytes / 2**20:.1f} MiB "
        f"({report.added} added now, {report.existing} from an earlier run, "
        f"{len(report.skipped)} skipped)"
    )
    for entry in report.skipped[:shown]:
        console.print(f"  skipped {entry['reason']}")
    if len(report.skipped) > shown:
        console.print(f"  ... and {len(report.skipped) - shown} more, listed in metadata.json")


if __name__ == "__main__":
    sys.exit(main())
