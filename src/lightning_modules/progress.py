"""Training progress: Rich in a terminal, periodic plain lines (step, loss, ETA) otherwise."""

from __future__ import annotations

from typing import Any

import pytorch_lightning as pl
from pytorch_lightning.callbacks import ProgressBar, RichProgressBar

from src.utils.progress import INTERVAL_S, PlainReporter, interactive


class StepRichProgressBar(RichProgressBar):
    """Rich's bar, counting steps when the run is bounded by `max_steps` (Lightning's own says
    "Epoch 0/-2" there)."""

    def _get_train_description(self, current_epoch: int) -> str:
        trainer = self.trainer
        if trainer.max_epochs is not None and trainer.max_epochs >= 0:
            return super()._get_train_description(current_epoch)
        description = f"Epoch {current_epoch}, step {trainer.global_step}/{trainer.max_steps}"
        return f"{description:{len(self.validation_description)}}"


class PlainProgressBar(ProgressBar):
    """One line every `interval` seconds: step, epoch, the progress-bar metrics and an ETA."""

    def __init__(self, interval: float = INTERVAL_S) -> None:
        super().__init__()
        self.interval = interval
        self._enabled = True
        self._reporter: PlainReporter | None = None

    def disable(self) -> None:
        self._enabled = False

    def enable(self) -> None:
        self._enabled = True

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        total = trainer.max_steps if trainer.max_steps and trainer.max_steps > 0 else None
        self._reporter = PlainReporter("training step", total, self.interval)

    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, *_: Any
    ) -> None:
        if not self._enabled or self._reporter is None:
            return
        metrics = self.get_metrics(trainer, pl_module)
        shown = ", ".join(
            f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}"
            for k, v in metrics.items()
            if k != "v_num"
        )
        self._reporter.update(trainer.global_step, f"epoch {trainer.current_epoch}, {shown}")

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._enabled and not trainer.sanity_checking:
            metrics = {k: v for k, v in trainer.callback_metrics.items() if k.startswith("val/")}
            shown = ", ".join(f"{k} {float(v):.4g}" for k, v in sorted(metrics.items()))
            print(f"validation at step {trainer.global_step}: {shown}", flush=True)

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._enabled and self._reporter is not None:
            self._reporter.update(trainer.global_step, "done", force=True)


def progress_bar(interval: float = INTERVAL_S) -> ProgressBar:
    """The bar for where the run's output goes: Rich in a terminal, plain lines elsewhere."""
    return StepRichProgressBar() if interactive() else PlainProgressBar(interval)
