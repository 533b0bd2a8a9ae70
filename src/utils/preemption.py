"""Stopping on a signal with a checkpoint to resume from (preemption, `kill`, a scheduler's notice).

`CheckpointOnSignal` turns SIGTERM, and SIGUSR1 where Lightning's SLURM auto-requeue does not
already own it, into: finish the current training step, save `hpc_ckpt_<n>.ckpt` in the run
directory (Lightning's name for a requeue checkpoint), stop. The next run in that directory (a
requeued SLURM job) or `resume=true` continues from it.

The handler only sets a flag; the save happens between steps, after every rank has agreed (one
tiny all-reduce per step), so all ranks of a DDP run stop at the same step and the checkpoint
holds a consistent state, whichever process the signal reached.
"""

from __future__ import annotations

import logging
import signal
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
from lightning_fabric.plugins.environments import SLURMEnvironment

from src.utils.checkpoints import next_interrupted_checkpoint

log = logging.getLogger(__name__)


class Interrupted(SystemExit):
    """Training stopped on a signal after saving a checkpoint; exits with 128 + the signal number."""

    def __init__(self, signum: int, path: Path) -> None:
        super().__init__(128 + signum)
        self.signum = signum
        self.path = path


class CheckpointOnSignal(pl.Callback):
    """Save a resumable checkpoint and stop when the process receives SIGTERM or SIGUSR1.

    Args:
        signals: names of the signals to handle. SIGUSR1 is left to Lightning when it runs under
            SLURM with auto-requeue (Lightning saves and requeues on it itself).
    """

    def __init__(self, signals: tuple[str, ...] | list[str] = ("SIGTERM", "SIGUSR1")) -> None:
        self.signals = [signal.Signals[name] for name in signals]
        self.received: int | None = None
        self._previous: dict[int, Any] = {}

    def _handle(self, signum: int, _frame: Any) -> None:
        self.received = signum

    def _owned_by_lightning(self, trainer: pl.Trainer, signum: int) -> bool:
        # The environment Lightning chose (its signal connector reads the same attribute).
        env = trainer._accelerator_connector.cluster_environment
        return (
            isinstance(env, SLURMEnvironment) and env.auto_requeue and signum == env.requeue_signal
        )

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.received = None
        for signum in self.signals:
            if not self._owned_by_lightning(trainer, signum):
                self._previous[signum] = signal.signal(signum, self._handle)

    def on_train_batch_end(self, trainer: pl.Trainer, *args: Any, **kwargs: Any) -> None:
        # Every rank takes part in the decision, so every rank saves and stops at this step.
        if not trainer.strategy.reduce_boolean_decision(self.received is not None, all=False):
            return
        path = next_interrupted_checkpoint(trainer.default_root_dir)
        trainer.save_checkpoint(path)
        signum = self.received if self.received is not None else signal.SIGTERM
        if trainer.is_global_zero:
            log.warning(
                "stopped by %s at step %d; saved %s (resume: run again in this directory, or "
                "resume=true)",
                signal.Signals(signum).name,
                trainer.global_step,
                path,
            )
        raise Interrupted(int(signum), Path(path))

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self._restore()

    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, err: Any) -> None:
        self._restore()

    def _restore(self) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        self._previous = {}
