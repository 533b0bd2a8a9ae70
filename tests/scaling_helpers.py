"""Test-only pieces for the scaling tests, importable by `train.py` subprocesses (`tests.scaling_helpers`)."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch
from compressai.entropy_models import EntropyModel
from torch.utils.data import DataLoader, DistributedSampler

from src.datamodules.images import decode_rgb, list_images


class FixedPatches(pl.LightningDataModule):
    """The same crops in the same order on every run: `count` training and 4 validation patches.

    DDP on two ranks with batch b must see exactly the images one process sees with batch 2b, so
    there are no random crops, flips or shuffling here (rank r takes patches r, r+2, ...).
    """

    def __init__(
        self, root: str, crop: int, batch_size: int, count: int = 16, **_sample_keys: Any
    ) -> None:
        # `_sample_keys`: the rest of conf/data/sample.yaml (workers, repeat, ...), unused here.
        super().__init__()
        self.batch_size = batch_size
        photos = [decode_rgb(p) for p in list_images(Path(root) / "train")]
        patches = []
        for i in range(count + 4):
            img = photos[i % len(photos)]
            h, w = img.shape[-2:]
            top = (37 * i) % (h - crop)
            left = (91 * i) % (w - crop)
            patches.append(img[:, top : top + crop, left : left + crop].float().div(255))
        self.train_patches, self.val_patches = patches[:count], patches[count:]

    def train_dataloader(self) -> DataLoader:
        # Lightning's own distributed sampler would shuffle the training set; this one keeps order.
        sampler = None
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            sampler = DistributedSampler(self.train_patches, shuffle=False)
        return DataLoader(self.train_patches, batch_size=self.batch_size, sampler=sampler)

    def val_dataloader(self) -> DataLoader:
        return DataLoader(self.val_patches, batch_size=2, shuffle=False)


class FixedQuantizationNoise(pl.Callback):
    """Training-time quantisation noise that depends on the position in a latent only.

    CompressAI draws fresh uniform noise per element; two DDP ranks and one process holding both
    halves of the batch would draw different noise. The same pattern for every image makes the
    two set-ups compute the same function, so their losses can be compared tightly.
    """

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        original = EntropyModel.quantize

        def quantize(model: EntropyModel, inputs: torch.Tensor, mode: str, means: Any = None):
            if mode != "noise":
                return original(model, inputs, mode, means)
            generator = torch.Generator().manual_seed(inputs[0].numel())
            noise = torch.rand(inputs.shape[1:], generator=generator) - 0.5
            return inputs + noise.to(inputs)

        EntropyModel.quantize = quantize


class RecordRun(pl.Callback):
    """Write the loss of every step (averaged over ranks), the final val/loss and the weights."""

    def __init__(self, path: str) -> None:
        self.path = Path(path)
        self.losses: list[float] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        loss = outputs["loss"] if isinstance(outputs, dict) else outputs
        self.losses.append(float(trainer.strategy.reduce(loss.detach(), reduce_op="mean")))

    def on_train_end(self, trainer, pl_module) -> None:
        if trainer.is_global_zero:
            val = trainer.callback_metrics.get("val/loss")
            record = {"losses": self.losses, "val_loss": None if val is None else float(val)}
            self.path.write_text(json.dumps(record))
            torch.save(pl_module.state_dict(), self.path.with_suffix(".pt"))


class SlowAfter(pl.Callback):
    """From step `step` on, write `marker` and slow each step down (time for a test's signal)."""

    def __init__(self, step: int, marker: str, delay: float = 0.3) -> None:
        self.step = step
        self.marker = Path(marker)
        self.delay = delay

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if trainer.global_step >= self.step:
            if not self.marker.exists():
                self.marker.write_text(str(trainer.global_step))
            time.sleep(self.delay)


class RecordStart(pl.Callback):
    """Write the step training (re)starts at."""

    def __init__(self, path: str) -> None:
        self.path = Path(path)

    def on_train_start(self, trainer, pl_module) -> None:
        self.path.write_text(str(trainer.global_step))
