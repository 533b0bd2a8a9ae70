"""Training steps/s of the framework against a plain PyTorch loop on the same codec, batch and crop.

The plain loop is CompressAI's examples/train.py reduced to its step: Adam on the network, Adam
on the quantiles, λ·255²·MSE + bpp, clip 1.0. The framework runs the default config (quickstart
recipe, TensorBoard logging, progress bar) through Lightning. Both draw crops from the same
in-memory photos; timing skips warm-up steps; the two alternate `--repeats` times and each keeps
its best, so a passing background load does not decide the ratio. Target: framework / plain >= 0.97.

    python benchmarks/train_throughput.py [--steps 200] [--warmup 20] [--batch 8] [--crop 128] [--repeats 3]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import pytorch_lightning as pl
import torch
from compressai.models import ScaleHyperprior
from hydra import compose, initialize_config_dir
from hydra.core.hydra_config import HydraConfig
from omegaconf import open_dict
from plain_loop import PlainLoop

from src.datamodules.sample import SampleDataModule
from src.training import train
from src.utils.resolvers import register

REPO = Path(__file__).resolve().parents[1]


class StepClock(pl.Callback):
    """Wall-clock time at the end of every training batch."""

    def __init__(self) -> None:
        self.times: list[float] = []

    def on_train_batch_end(self, *args) -> None:
        self.times.append(time.perf_counter())


def steps_per_second(times: list[float], warmup: int) -> float:
    return (len(times) - 1 - warmup) / (times[-1] - times[warmup])


def plain_loop(
    data: SampleDataModule, n: int, m: int, lmbda: float, steps: int, warmup: int
) -> float:
    loop = PlainLoop(ScaleHyperprior(n, m), lmbda, lr=1e-4)
    times = []
    loader = data.train_dataloader()
    while len(times) <= steps:
        for x in loader:
            loop.step(x)
            times.append(time.perf_counter())
            if len(times) > steps:
                break
    return steps_per_second(times, warmup)


def framework(cfg, steps: int, warmup: int) -> float:
    clock = StepClock()
    with open_dict(cfg):
        cfg.trainer.max_steps = steps + 1
        cfg.trainer.val_check_interval = 10**6
        cfg.trainer.limit_val_batches = 0
        cfg.print_summary = False
    train(cfg, extra_callbacks=[clock])
    return steps_per_second(clock.times, warmup)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--warmup", type=int, default=20)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--crop", type=int, default=128)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    register()
    out = Path(tempfile.mkdtemp(prefix="bench-"))
    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        cfg = compose(
            "train",
            overrides=[
                "experiment=quickstart",
                f"data.batch_size={args.batch}",
                f"data.crop={args.crop}",
                f"hydra.run.dir={out}",
                "callbacks.model_checkpoint=null",
            ],
            return_hydra_config=True,
        )
    HydraConfig.instance().set_config(cfg)
    with open_dict(cfg):
        cfg.paths.output_dir = str(out)
        cfg.paths.root_dir = str(REPO)
    data = SampleDataModule(root=cfg.data.root, crop=args.crop, batch_size=args.batch, repeat=64)
    data.prepare_data()
    data.setup("fit")
    n, m = cfg.model.codec.N, cfg.model.codec.M
    plain = ours = 0.0
    for _ in range(args.repeats):
        pl.seed_everything(0)
        plain = max(plain, plain_loop(data, n, m, float(cfg.model.lmbda), args.steps, args.warmup))
        pl.seed_everything(0)
        ours = max(ours, framework(cfg, args.steps, args.warmup))
    print(
        f"codec bmshj2018-hyperprior N={n} M={m}, batch {args.batch}x{args.crop}², "
        f"{args.threads} threads, {args.steps} steps ({args.warmup} warm-up), best of {args.repeats}"
    )
    print(f"plain PyTorch loop: {plain:7.2f} steps/s")
    print(f"framework:          {ours:7.2f} steps/s")
    print(f"ratio:              {ours / plain:7.3f}  (target >= 0.97)")


if __name__ == "__main__":
    main()
