"""What a resumed run needs to continue exactly where the interrupted one stopped.

Lightning restores the weights, optimisers, schedulers and loop counters, and (through torchdata's
`StatefulDataLoader`, see `src/datamodules/base.py`) the position inside the epoch, the sampler,
the worker seeds and the crop generators. Two things are left, and live here:

- `NewestLastCheckpoint`: `last.ckpt` is rewritten at every validation and at the end of fit,
  whether or not the monitored metric improved (Lightning's `ModelCheckpoint` rewrites it only
  together with a new best one, so a plateau leaves it behind by days).
- `ResumeExactly`: every checkpoint also holds the process's global random state (torch, CUDA,
  numpy, Python: the codec's training noise and anything else drawing from them) and the last
  logged metrics (a plateau schedule reads `val/loss` at the end of an epoch that may come before
  the resumed run's first validation). Both are put back as training starts: after the loaders
  rebuilt their iterators (which draws seeds) and before the first batch.

What a resumed run does differently must not draw from the global state: Lightning skips the
sanity check on resume, so a resumed run starts its validation loader's workers at another
validation than the uninterrupted run did; that is why validation loaders seed their workers
from a generator of their own (`src/datamodules/base.py`).
"""

from __future__ import annotations

from typing import Any

import pytorch_lightning as pl
import torch
from pytorch_lightning.callbacks import ModelCheckpoint

from src.utils.random_state import capture_random_state, restore_random_state


class NewestLastCheckpoint(ModelCheckpoint):
    """Lightning's `ModelCheckpoint`, with `last.ckpt` always holding the newest state."""

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        super().on_validation_end(trainer, pl_module)
        self._refresh_last(trainer)

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        super().on_train_end(trainer, pl_module)
        self._refresh_last(trainer)

    def _refresh_last(self, trainer: pl.Trainer) -> None:
        # Skipped in a sanity check, outside fit, and when this step is saved already.
        if self.save_last and not self._should_skip_saving_checkpoint(trainer):
            self._save_last_checkpoint(trainer, self._monitor_candidates(trainer))


class ResumeExactly(pl.Callback):
    """Save the global random state and the last logged metrics with every checkpoint; put them
    back when a run resumes (see the module docstring)."""

    def __init__(self) -> None:
        self._trainer: pl.Trainer | None = None
        self._restore: dict[str, Any] | None = None

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self._trainer = trainer

    def state_dict(self) -> dict[str, Any]:
        metrics = self._trainer.callback_metrics if self._trainer is not None else {}
        return {
            "random": capture_random_state(),
            "metrics": {
                name: value.detach().cpu().clone()
                for name, value in metrics.items()
                if isinstance(value, torch.Tensor) and value.numel() == 1
            },
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._restore = state_dict

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._restore is None:
            return
        restore_random_state(self._restore["random"])
        device = pl_module.device
        trainer.callback_metrics.update(
            {name: value.to(device) for name, value in self._restore["metrics"].items()}
        )
        self._restore = None
