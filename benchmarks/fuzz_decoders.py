"""Fuzz every decoder with CRC-valid mutations of real files, each decode in a child process.

For every family (the six CompressAI presets, HiFIC, QVRF at rate indices and factors, with a
factorized-style and an autoregressive backbone, QRes-VAE lossy / lossless / first-k-groups
files, McQuic, iREC lossy and lossless), a tiny seeded codec codes crops of the built-in sample
photos (whole and tiled); those files are mutated (header fields, latent shapes, stream counts,
stream lengths, stream bytes, tile records, truncation and extension of the whole file) and
the CRC is recomputed, so every file reaches the decoder's own checks. Long-lived worker
processes decode them through `Codec.decompress_bytes`, the path of `lic decompress`; a worker
that dies is a crash, one that runs past `--timeout` a hang, and either is restarted, so one
bad file is counted rather than fatal. Per family it prints the files, the framework's own
errors (LicError), the files that decoded, crashes, hangs, other exceptions (bugs) and the peak
resident memory of the workers (restarted per family).

    python benchmarks/fuzz_decoders.py --files 100000 [--workers 2] [--families hific mcquic]
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import random
import resource
import struct
import sys
import time
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, replace
from multiprocessing.connection import Connection, wait
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from src.codecs.base import Codec  # noqa: E402
from src.coding.container import (  # noqa: E402
    Rate,
    pack,
    pack_tile,
    unpack,
    unpack_tile,
)
from src.errors import LicError  # noqa: E402

# Decoding a mutated file may claim any size up to this (256 x 256): garbage decodes stay quick,
# even autoregressive ones.
FUZZ_MAX_PIXELS = 1 << 16
# The images each family codes: whole crops (one not a multiple of any stride) and a tiled one.
CROPS = ((64, 64, None), (48, 80, None), (96, 130, 64))


def _compressai(arch: str) -> Callable[[], Codec]:
    def build() -> Codec:
        from src.codecs.compressai_zoo import CompressAICodec

        return CompressAICodec(arch, quality=1, N=8, M=8)

    return build


def _hific() -> Codec:
    from src.codecs.hific import HificCodec

    return HificCodec(N=4, M=8, hyper_channels=8, n_residual_blocks=1)


def _qvrf(arch: str) -> Callable[[], Codec]:
    def build() -> Codec:
        from src.codecs.qvrf import QvrfCodec

        return QvrfCodec(arch, N=8, M=8)

    return build


def _qres(lossless: bool) -> Callable[[], Codec]:
    def build() -> Codec:
        from src.codecs.qres_vae import QResVAE

        return QResVAE("qres34m", N=8, lossless=lossless)

    return build


def _mcquic() -> Codec:
    from src.codecs.mcquic import McQuic

    return McQuic(m=2, N=8, codebook_sizes=[16, 8])


def _irec_lossy() -> Codec:
    from src.codecs.irec import IrecLossy

    return IrecLossy(N=8, M=8)


def _irec_lossless() -> Codec:
    from src.codecs.irec import IrecLossless

    return IrecLossless(N=8, z_channels=4, num_blocks=2)


@dataclass(frozen=True)
class Family:
    """A tiny codec of one family and the rate settings its files are coded at."""

    build: Callable[[], Codec]
    rates: tuple[Rate | None, ...] = (None,)
    partial: bool = False  # also keep files holding only the first k streams


QVRF_RATES = (Rate.index(0), Rate.index(5), Rate.factor(1.7))
FAMILIES: dict[str, Family] = {
    "bmshj2018-factorized": Family(_compressai("bmshj2018-factorized")),
    "bmshj2018-hyperprior": Family(_compressai("bmshj2018-hyperprior")),
    "mbt2018-mean": Family(_compressai("mbt2018-mean")),
    "mbt2018": Family(_compressai("mbt2018")),
    "cheng2020-anchor": Family(_compressai("cheng2020-anchor")),
    "cheng2020-attn": Family(_compressai("cheng2020-attn")),
    "hific": Family(_hific),
    "qvrf-bmshj2018-hyperprior": Family(_qvrf("bmshj2018-hyperprior"), QVRF_RATES),
    "qvrf-mbt2018": Family(_qvrf("mbt2018"), QVRF_RATES),
    "qres34m": Family(_qres(False), partial=True),
    "qres34m_lossless": Family(_qres(True), partial=True),
    "mcquic": Family(_mcquic),
    "irec-lossy": Family(_irec_lossy),
    "irec-lossless": Family(_irec_lossless),
}


def build_codec(name: str) -> Codec:
    """The family's tiny codec, seeded by its name: the same weights in every process."""
    torch.manual_seed(zlib.crc32(name.encode()))
    codec = FAMILIES[name].build().eval()
    codec.prepare_for_coding()
    return codec


# ---- real files ---------------------------------------------------------------------------------
def sample_crops(root: Path) -> list[tuple[torch.Tensor, int | None]]:
    """Crops of the sample photos, one per entry of CROPS, in [0, 1]."""
    from PIL import Image

    from src.datamodules.sample import gather_sample_photos
    from src.evaluation.baselines import from_pil

    photos = sorted(gather_sample_photos(root).rglob("*.*"))
    crops = []
    for i, (h, w, tile) in enumerate(CROPS):
        with Image.open(photos[i % len(photos)]) as img:
            x = from_pil(img.convert("RGB"))
        top, left = (x.shape[-2] - h) // 2, (x.shape[-1] - w) // 2
        crops.append((x[..., top : top + h, left : left + w], tile))
    return crops


@torch.no_grad()
def seed_files(
    name: str, codec: Codec, crops: list[tuple[torch.Tensor, int | None]]
) -> list[bytes]:
    """The family's real files: every crop at every rate, plus first-k-stream files if partial."""
    family = FAMILIES[name]
    files = []
    for x, tile in crops:
        for rate in family.rates:
            files.append(codec.compress_to_bytes(x, rate, tile=tile))
    if family.partial:
        whole = unpack(files[0])
        files += [pack(replace(whole, streams=whole.streams[:k])) for k in (1, 3)]
    return files


# ---- mutations ----------------------------------------------------------------------------------
def _noise(rng: random.Random, n: int) -> bytes:
    kind = rng.randrange(3)
    if kind == 0:
        return b"\xff" * n
    if kind == 1:
        return b"\x00" * n
    return rng.randbytes(n)


def _mutate_bytes(rng: random.Random, data: bytes) -> bytes:
    """Flip bits, overwrite a run, cut or extend `data`."""
    out = bytearray(data)
    op = rng.randrange(5)
    if op == 0 and out:
        for _ in range(rng.randint(1, 8)):
            out[rng.randrange(len(out))] ^= 1 << rng.randrange(8)
    elif op == 1 and out:
        start = rng.randrange(len(out))
        run = _noise(rng, rng.randint(1, max(1, min(64, len(out) - start))))
        out[start : start + len(run)] = run
    elif op == 2:
        del out[rng.randrange(len(out) + 1) :]
    elif op == 3:
        out += _noise(rng, rng.choice((1, 3, 4, 16, 200, 4096)))
    else:
        pos = rng.randrange(len(out) + 1)
        out[pos:pos] = _noise(rng, rng.randint(1, 32))
    return bytes(out)


def _mutate_streams(rng: random.Random, streams: list[bytes]) -> list[bytes]:
    """Drop, duplicate or add a stream, or mutate the bytes (and length) of one."""
    streams = list(streams)
    op = rng.randrange(6)
    if op == 0 and streams:
        streams.pop(rng.randrange(len(streams)))
    elif op == 1 and streams:
        streams.insert(rng.randrange(len(streams) + 1), rng.choice(streams))
    elif op == 2:
        streams.insert(rng.randrange(len(streams) + 1), _noise(rng, rng.choice((0, 1, 8, 300))))
    elif streams:
        i = rng.randrange(len(streams))
        streams[i] = _mutate_bytes(rng, streams[i])
    return streams


def _mutate_shape(rng: random.Random, shape: tuple[int, ...]) -> tuple[int, ...]:
    dims = list(shape)
    op = rng.randrange(4)
    if op == 0 and dims:
        i = rng.randrange(len(dims))
        dims[i] = max(1, dims[i] + rng.choice((-1, 1, 2, 15, 100)))
    elif op == 1 and dims:
        dims.pop(rng.randrange(len(dims)))
    elif op == 2:
        dims.insert(rng.randrange(len(dims) + 1), rng.randint(1, 64))
    else:
        dims = [rng.choice((1, 2, 64, 1024, 65535)) for _ in range(rng.randint(0, 3))]
    return tuple(dims)


def mutate(rng: random.Random, data: bytes, codec: Codec) -> bytes:
    """One CRC-valid mutation of the file `data` of `codec`."""
    c = unpack(data)
    op = rng.randrange(12)
    if op == 0:  # image size alone
        h, w = c.image_size
        c = replace(
            c, image_size=(max(1, h + rng.randint(-70, 70)), max(1, w + rng.randint(-70, 70)))
        )
    elif op == 1:  # a consistent size claim: size and matching latent shape (the 4096^2 file)
        h, w = rng.choice(
            ((4096, 4096), (1024, 1024), (rng.randint(1, 1500), rng.randint(1, 1500)))
        )
        shape = c.latent_shape if c.tile else codec.expected_latent_shape((h, w))
        c = replace(c, image_size=(h, w), latent_shape=shape)
    elif op == 2:
        c = replace(c, latent_shape=_mutate_shape(rng, c.latent_shape))
    elif op == 3:
        rate = rng.choice(
            (None, Rate.index(rng.randint(0, 20)), Rate.factor(rng.uniform(-2.0, 20.0)))
        )
        c = replace(c, rate=rate)
    elif op == 4:
        c = replace(c, tile=rng.choice((0, 1, 32, 64, 128, rng.randint(0, 5000))))
    elif op in (5, 6, 7):
        c = replace(c, streams=_mutate_streams(rng, c.streams))
    elif op == 8 and not (c.tile and c.streams):
        c = replace(c, streams=_mutate_streams(rng, c.streams))
    elif op == 8:  # inside one tile record
        i = rng.randrange(len(c.streams))
        try:
            shape, streams = unpack_tile(c.streams[i])
        except LicError:
            shape, streams = (), []
        if rng.random() < 0.5:
            shape = _mutate_shape(rng, shape)
        else:
            streams = _mutate_streams(rng, streams)
        records = list(c.streams)
        records[i] = pack_tile(shape[:8], streams)
        c = replace(c, streams=records)
    elif op == 9:
        c = replace(c, fingerprint=rng.randbytes(8) if rng.random() < 0.5 else c.fingerprint)
    try:
        body = pack(c)[:-4] if op <= 9 else data[:-4]
    except ValueError:  # a field pack refuses: mutate the bytes instead
        body = data[:-4]
    if op >= 10 or rng.random() < 0.1:  # any byte of the file, header included
        body = _mutate_bytes(rng, body)
    return body + struct.pack("<I", zlib.crc32(body))


# ---- the workers --------------------------------------------------------------------------------
def peak_rss_kb() -> int:
    """This process's peak resident memory since start or since `reset_peak_rss` (Linux)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1])
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss


def reset_peak_rss() -> None:
    """Start counting the peak resident memory afresh (writing 5 to clear_refs, Linux >= 4.0)."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        pass


def _worker(conn: Connection, max_pixels: int) -> None:
    """Decode (family, file) requests until the pipe closes; answer (outcome, detail, peak KB).
    A request with no file starts a new family: its codec is built, the peak memory reset."""
    torch.set_num_threads(1)
    codecs: dict[str, Codec] = {}
    conn.send("ready")
    while True:
        try:
            name, data = conn.recv()
        except EOFError:
            return
        if data is None:
            codecs = {name: build_codec(name)}
            reset_peak_rss()
            conn.send(("ready", "", peak_rss_kb()))
            continue
        outcome, detail = "decoded", ""
        try:
            if name not in codecs:
                codecs[name] = build_codec(name)
            codecs[name].decompress_bytes(data, max_pixels=max_pixels)
        except LicError as err:
            outcome, detail = "error", type(err).__name__
        except Exception as err:  # noqa: BLE001 - anything else is a bug to report
            outcome, detail = "bug", f"{type(err).__name__}: {err}"[:300]
        conn.send((outcome, detail, peak_rss_kb()))


class Worker:
    """One long-lived decoding process; restarted after a crash or a hang."""

    def __init__(self, max_pixels: int) -> None:
        self.max_pixels = max_pixels
        self.deadline = 0.0
        self.family: str | None = None
        self.start()

    def start(self) -> None:
        parent, child = mp.get_context("spawn").Pipe()
        self.process = mp.get_context("spawn").Process(
            target=_worker, args=(child, self.max_pixels), daemon=True
        )
        self.process.start()
        child.close()
        self.conn = parent
        if not parent.poll(600) or parent.recv() != "ready":
            raise RuntimeError("fuzz worker did not start")

    def stop(self) -> None:
        self.conn.close()
        self.process.join(10)
        if self.process.is_alive():
            self.process.kill()
            self.process.join()

    def restart(self) -> None:
        if self.process.is_alive():
            self.process.kill()
        self.process.join()
        self.conn.close()
        self.start()
        if self.family is not None:
            self.begin(self.family)

    def begin(self, family: str) -> None:
        """Build `family`'s codec and reset the peak memory before its files arrive."""
        self.family = family
        self.conn.send((family, None))
        if not self.conn.poll(600) or self.conn.recv()[0] != "ready":
            raise RuntimeError(f"fuzz worker could not build {family}")


@dataclass
class Tally:
    """What happened to one family's files."""

    files: int = 0
    errors: int = 0
    decoded: int = 0
    crashes: int = 0
    hangs: int = 0
    bugs: int = 0
    peak_kb: int = 0
    seconds: float = 0.0
    examples: list[str] = field(default_factory=list)

    def row(self, name: str) -> str:
        return (
            f"| {name} | {self.files} | {self.errors} | {self.decoded} | {self.crashes} | "
            f"{self.hangs} | {self.bugs} | {self.peak_kb / 1024:.0f} |"
        )


def fuzz(
    jobs: Iterator[tuple[str, bytes]],
    workers: list[Worker],
    timeout: float,
    tallies: dict,
    until: float = float("inf"),
) -> None:
    """Decode every (family, file) of `jobs` on `workers` (no new file after the monotonic time
    `until`), counting outcomes into `tallies`."""
    busy: dict[Worker, str] = {}
    jobs = iter(jobs)
    exhausted = False
    while True:
        for w in workers:
            if w not in busy and not exhausted:
                job = next(jobs, None) if time.monotonic() < until else None
                if job is None:
                    exhausted = True
                    break
                w.conn.send(job)
                w.deadline = time.monotonic() + timeout
                busy[w] = job[0]
        if not busy:
            return
        left = max(0.0, min(w.deadline for w in busy) - time.monotonic())
        ready = wait([w.conn for w in busy], timeout=left)
        for w in list(busy):
            tally = tallies[busy[w]]
            if w.conn in ready:
                try:
                    outcome, detail, peak = w.conn.recv()
                except (EOFError, ConnectionError):
                    tally.files += 1
                    tally.crashes += 1
                    tally.examples.append(f"crash (exit {w.process.exitcode})")
                    w.restart()
                    del busy[w]
                    continue
                tally.files += 1
                tally.peak_kb = max(tally.peak_kb, peak)
                if outcome == "decoded":
                    tally.decoded += 1
                elif outcome == "error":
                    tally.errors += 1
                else:
                    tally.bugs += 1
                    tally.examples.append(detail)
                del busy[w]
            elif time.monotonic() >= w.deadline:
                tally.files += 1
                tally.hangs += 1
                tally.examples.append(f"hang (> {timeout:g} s)")
                w.restart()
                del busy[w]


def mutated_files(
    name: str, codec: Codec, seeds: list[bytes], count: int, seed: int
) -> Iterator[tuple[str, bytes]]:
    """The family's real files, then mutations of them (1 to 3 each) up to `count` files."""
    rng = random.Random(f"{seed}-{name}")
    for i in range(count):
        data = seeds[i % len(seeds)]
        if i >= len(seeds):
            for _ in range(rng.choice((1, 1, 2, 3))):
                try:
                    data = mutate(rng, data, codec)
                except LicError:  # an earlier mutation left an unparsable file: mutate its bytes
                    body = _mutate_bytes(rng, data[:-4])
                    data = body + struct.pack("<I", zlib.crc32(body))
        yield name, data


def run(
    names: list[str],
    files_per_family: int,
    workers: int,
    timeout: float,
    seed: int = 0,
    photos: Path = Path("data") / "sample",
    max_pixels: int = FUZZ_MAX_PIXELS,
    seconds_per_family: float = float("inf"),
) -> dict[str, Tally]:
    """Fuzz `names` one family after another on one pool of workers (each family's peak memory
    counted afresh), at most `files_per_family` files or `seconds_per_family` each."""
    crops = sample_crops(photos)
    tallies = {name: Tally() for name in names}
    pool = [Worker(max_pixels) for _ in range(workers)]
    for name in names:
        codec = build_codec(name)
        seeds = seed_files(name, codec, crops)
        for w in pool:
            w.begin(name)
        start = time.perf_counter()
        files = mutated_files(name, codec, seeds, files_per_family, seed)
        fuzz(files, pool, timeout, tallies, time.monotonic() + seconds_per_family)
        tallies[name].seconds = time.perf_counter() - start
        print(f"{tallies[name].row(name)} {tallies[name].seconds:.0f} s", file=sys.stderr)
    for w in pool:
        w.stop()
    return tallies


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--files", type=int, default=100_000, help="files in all")
    parser.add_argument("--families", nargs="*", default=list(FAMILIES), choices=list(FAMILIES))
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--timeout", type=float, default=60.0, help="seconds before a hang")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--max-pixels", type=int, default=FUZZ_MAX_PIXELS)
    parser.add_argument("--minutes", type=float, help="stop each family after its share of this")
    parser.add_argument("--json", type=Path, help="also write the tallies here")
    args = parser.parse_args()
    torch.set_num_threads(1)
    per_family = -(-args.files // len(args.families))
    start = time.perf_counter()
    share = (args.minutes or float("inf")) * 60 / len(args.families)
    tallies = run(
        args.families,
        per_family,
        args.workers,
        args.timeout,
        args.seed,
        max_pixels=args.max_pixels,
        seconds_per_family=share,
    )
    columns = "family files|framework errors|decoded|crashes|hangs|other exceptions|peak RSS (MB)"
    print("| " + " | ".join(columns.replace("family ", "family|").split("|")) + " |")
    print("|---|---|---|---|---|---|---|---|")
    for name, tally in tallies.items():
        print(tally.row(name))
    total = Tally()
    for tally in tallies.values():
        for key in ("files", "errors", "decoded", "crashes", "hangs", "bugs"):
            setattr(total, key, getattr(total, key) + getattr(tally, key))
        total.peak_kb = max(total.peak_kb, tally.peak_kb)
    print(total.row("**all**"))
    print(f"{time.perf_counter() - start:.0f} s, {args.workers} workers")
    for name, tally in tallies.items():
        for example in tally.examples[:5]:
            print(f"{name}: {example}")
    if args.json:
        args.json.write_text(json.dumps({k: vars(v) for k, v in tallies.items()}, indent=1))


if __name__ == "__main__":
    main()
