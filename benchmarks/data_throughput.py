"""Crops/s from an LMDB and from the same images as a folder, with 0 and 2 workers, and the share
of a training step spent waiting for data (bmshj2018-hyperprior, batch 8, CPU).

The images are the built-in sample photos (real JPEGs and PNGs, 0.3 to 1.4 megapixels), or any
folder given with --images; they are packed into a temporary LMDB first. Crops are decoded from
the stored bytes every time (no cache), as on a real dataset. The training step is the recipe's
(Adam on the network, Adam on the quantiles, bpp + lambda * 255^2 * MSE); "waiting" is the time
`next(loader)` blocks between steps.
Target: waiting < 5 % of the step.

    python benchmarks/data_throughput.py [--images DIR] [--batches 40] [--steps 12] [--crop 256]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch
from torch.utils.data import DataLoader

from src.codecs.compressai_zoo import CompressAICodec
from src.datamodules.datasets import FolderSource, ImageSource, RandomCropDataset
from src.datamodules.lmdb import LmdbSource, build_lmdb, folder_items
from src.datamodules.sample import gather_sample_photos
from src.losses.rate_distortion import RateDistortionLoss, lmbda_for


def loader(source: ImageSource, crop: int, batch: int, workers: int) -> DataLoader:
    dataset = RandomCropDataset(source, range(len(source)), crop, repeat=1000)
    return DataLoader(
        dataset,
        batch_size=batch,
        shuffle=True,
        num_workers=workers,
        drop_last=True,
        persistent_workers=workers > 0,
    )


def crops_per_second(source: ImageSource, crop: int, batch: int, workers: int, n: int) -> float:
    """Crops/s over `n` batches after two warm-up batches (worker start-up excluded)."""
    it = iter(loader(source, crop, batch, workers))
    for _ in range(2):
        next(it)
    start = time.perf_counter()
    for _ in range(n):
        next(it)
    return n * batch / (time.perf_counter() - start)


def waiting_share(source: ImageSource, crop: int, batch: int, workers: int, steps: int) -> tuple:
    """(seconds per step, share of it spent waiting for the next batch) over `steps` training
    steps of bmshj2018-hyperprior (quality 3 widths) after two warm-up steps."""
    codec = CompressAICodec("bmshj2018-hyperprior", quality=3)
    rd_loss = RateDistortionLoss(lmbda=lmbda_for("mse", 3))
    aux_ids = {id(p) for p in codec.aux_parameters()}
    optimizer = torch.optim.Adam([p for p in codec.parameters() if id(p) not in aux_ids], 1e-4)
    aux_optimizer = torch.optim.Adam(list(codec.aux_parameters()), 1e-3)
    it = iter(loader(source, crop, batch, workers))
    waited = total = 0.0
    for step in range(steps + 2):
        t0 = time.perf_counter()
        x = next(it)
        t1 = time.perf_counter()
        optimizer.zero_grad()
        rd_loss(x, codec(x)).loss.backward()
        optimizer.step()
        aux_optimizer.zero_grad()
        codec.aux_loss().backward()
        aux_optimizer.step()
        if step >= 2:  # warm-up: worker start-up and first allocations
            waited += t1 - t0
            total += time.perf_counter() - t0
    return total / steps, waited / total


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=Path, help="a folder of images (default: sample photos)")
    parser.add_argument("--batches", type=int, default=40)
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--crop", type=int, default=256)
    parser.add_argument("--batch", type=int, default=8)
    args = parser.parse_args()
    torch.manual_seed(0)
    with tempfile.TemporaryDirectory() as tmp:
        images = args.images or gather_sample_photos(Path(tmp) / "sample")
        items, total = folder_items(images)
        build_lmdb(items, Path(tmp) / "db", source=str(images), total=total, progress=False)
        sources = {"folder": FolderSource(images), "lmdb": LmdbSource(Path(tmp) / "db")}
        print(f"{total} images from {images}, crop {args.crop}, batch {args.batch}")
        print(f"{'source':>8} {'workers':>8} {'crops/s':>9}")
        for name, source in sources.items():
            for workers in (0, 2):
                rate = crops_per_second(source, args.crop, args.batch, workers, args.batches)
                print(f"{name:>8} {workers:>8} {rate:>9.1f}")
        print(f"{'source':>8} {'workers':>8} {'s/step':>9} {'waiting':>9}")
        for workers in (0, 2):
            step, share = waiting_share(sources["lmdb"], args.crop, args.batch, workers, args.steps)
            print(f"{'lmdb':>8} {workers:>8} {step:>9.2f} {100 * share:>8.1f}%")


if __name__ == "__main__":
    main()
