"""Log original / reconstruction pairs to whichever image-capable loggers the run has."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from pytorch_lightning.loggers import Logger, TensorBoardLogger, WandbLogger
from pytorch_lightning.utilities import rank_zero_only
from torch import Tensor


@rank_zero_only
def log_reconstructions(loggers: Sequence[Logger], x: Tensor, x_hat: Tensor, step: int) -> None:
    """Each pair side by side (original | reconstruction), one image per pair."""
    pairs = torch.cat([x, x_hat], dim=-1).detach().float().clamp(0, 1).cpu()
    for logger in loggers:
        if isinstance(logger, TensorBoardLogger):
            logger.experiment.add_images("val/reconstructions", pairs, global_step=step)
        elif isinstance(logger, WandbLogger):
            logger.log_image("val/reconstructions", list(pairs), step=step)
