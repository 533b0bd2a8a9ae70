"""The plain CompressAI training loop: the reference a recipe of ours has to beat in the same minutes.

CompressAI's examples/train.py reduced to its loop: Adam on the network, Adam at 1e-3 on the
entropy bottleneck's quantiles, CompressAI's `RateDistortionLoss` (λ·255²·MSE + bpp), gradients
clipped at 1.0, a constant learning rate, random crops + flips of the sample photos' training
split. bmshj2018-hyperprior at CompressAI's quality-3 widths (N=128, M=192); lr 1e-3 and 8 × 128²
crops as in the CPU measurements (CompressAI's own 16 × 256² at 1e-4 barely moves in minutes on a
CPU). It trains for a wall-clock budget (or a number of steps), then writes the codec as an
exported file that `evaluate.py ckpt=...` and `lic compress --ckpt ...` read:

    python benchmarks/plain_loop.py --minutes 15 --out logs/bench/plain.codec [--lmbda 0.0035]
    python evaluate.py ckpt=logs/bench/plain.codec data=test_photos
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch
from compressai.losses import RateDistortionLoss
from torch import Tensor, nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from src.codecs.compressai_zoo import CompressAICodec  # noqa: E402
from src.codecs.export import export_codec  # noqa: E402
from src.datamodules.sample import SampleDataModule  # noqa: E402


class PlainLoop:
    """One step of CompressAI's example loop over a CompressAI model (`net`)."""

    def __init__(
        self, net: nn.Module, lmbda: float, lr: float, aux_lr: float = 1e-3, clip: float = 1.0
    ) -> None:
        self.net = net
        named = list(net.named_parameters())
        self.params = [p for n, p in named if not n.endswith(".quantiles")]
        quantiles = [p for n, p in named if n.endswith(".quantiles")]
        self.optimizer = torch.optim.Adam(self.params, lr=lr)
        self.aux_optimizer = torch.optim.Adam(quantiles, lr=aux_lr)
        self.criterion = RateDistortionLoss(lmbda=lmbda)
        self.clip = clip

    def step(self, x: Tensor) -> float:
        """Main and auxiliary update on one batch; returns the rate-distortion loss."""
        self.optimizer.zero_grad()
        self.aux_optimizer.zero_grad()
        loss = self.criterion(self.net(x), x)["loss"]
        loss.backward()
        if self.clip > 0:
            torch.nn.utils.clip_grad_norm_(self.params, self.clip)
        self.optimizer.step()
        self.net.aux_loss().backward()
        self.aux_optimizer.step()
        return float(loss.detach())


def train_plain(
    data: SampleDataModule, loop: PlainLoop, seconds: float | None, steps: int | None
) -> tuple[int, float]:
    """Step until the time or step budget is spent; returns (steps, seconds)."""
    start, done = time.monotonic(), 0
    while True:
        for x in data.train_dataloader():
            loop.step(x)
            done += 1
            elapsed = time.monotonic() - start
            if (steps is not None and done >= steps) or (
                seconds is not None and elapsed >= seconds
            ):
                return done, elapsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, help="the exported codec file to write")
    parser.add_argument("--minutes", type=float, default=15.0, help="wall-clock budget")
    parser.add_argument("--steps", type=int, default=None, help="stop after this many steps")
    parser.add_argument("--lmbda", type=float, default=0.0035, help="λ (the quick start's)")
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--quality", type=int, default=3, help="CompressAI's width table")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--crop", type=int, default=128)
    parser.add_argument("--data", default="data/sample", help="where the sample photos go")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--seed", type=int, default=1234)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    data = SampleDataModule(root=args.data, crop=args.crop, batch_size=args.batch, repeat=64)
    data.prepare_data()
    data.setup("fit")
    codec = CompressAICodec("bmshj2018-hyperprior", quality=args.quality)
    loop = PlainLoop(codec.net, args.lmbda, args.lr)
    codec.train()
    steps, seconds = train_plain(
        data, loop, 60 * args.minutes if args.minutes else None, args.steps
    )
    codec.eval()
    path = export_codec(codec, args.out)
    print(f"plain CompressAI loop: {steps} steps in {seconds / 60:.1f} min -> {path}")


if __name__ == "__main__":
    main()
