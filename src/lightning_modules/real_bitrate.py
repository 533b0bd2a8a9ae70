"""Real bits during training: every N validations, one image is entropy-coded for real.

The likelihood estimate is what the loss sees; the file is what a user gets. Logging both side by
side (`val/real_bpp`, `val/estimated_bpp`, `val/real_over_estimated`) catches coding tables that
lag behind the latents (CompressAI's quantiles) long before an evaluation would.
"""

from __future__ import annotations

from typing import Any

import pytorch_lightning as pl
import torch
from torch import Tensor


class RealBitrateMonitor(pl.Callback):
    """Compress and decompress the first validation image every `every_n_validations`.

    Runs on rank zero only; the recipe must hold its codec as `pl_module.codec`.
    """

    def __init__(self, every_n_validations: int = 1) -> None:
        if every_n_validations < 1:
            raise ValueError(f"every_n_validations must be >= 1, got {every_n_validations}")
        self.every_n_validations = every_n_validations
        self.validations = 0
        self._image: Tensor | None = None

    def on_validation_batch_end(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
        dataloader_idx: int = 0,
    ) -> None:
        if batch_idx == 0 and dataloader_idx == 0 and isinstance(batch, Tensor):
            self._image = batch[:1]

    @torch.no_grad()
    def on_validation_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.sanity_checking or self._image is None:
            return
        self.validations += 1
        if self.validations % self.every_n_validations or not trainer.is_global_zero:
            return
        codec, x = pl_module.codec, self._image
        codec.prepare_for_coding()
        data = codec.compress_to_bytes(x)
        codec.decompress_bytes(data)  # a file that does not decode must fail the run, not later
        pixels = x.shape[-2] * x.shape[-1]
        real = 8 * len(data) / pixels
        estimated = float(codec(x).total_bits().sum()) / pixels
        metrics = {
            "val/real_bpp": real,
            "val/estimated_bpp": estimated,
            "val/real_over_estimated": real / estimated,
        }
        pl_module.log_dict(metrics, rank_zero_only=True)
        self._image = None

    def state_dict(self) -> dict[str, int]:
        return {"validations": self.validations}

    def load_state_dict(self, state_dict: dict[str, int]) -> None:
        self.validations = state_dict["validations"]
