"""The QRes-VAE training recipe: the paper's loss, EMA weights, clipping and a gradient-spike guard.

Loss (Duan et al.): rate in nats per sub-pixel + λ · MSE of images on [-1, 1]; the lossless model
has no λ (its rate includes the pixels). The optimiser trains `online`; `codec` holds the
exponential moving average of its weights, and is what validation measures and what every
checkpoint stores as the codec (so `load_codec`, `evaluate.py` and the CLI use the EMA weights,
like the paper's released models). A step whose gradient norm is not finite or exceeds
`spike_factor` times the median of the last `spike_window` norms is skipped (or taken at a reduced
learning rate) and leaves the EMA untouched.
"""

from __future__ import annotations

import copy
import logging
import math
import statistics
from collections import deque
from typing import Any

import torch
from torch import Tensor

from src.codecs.base import Codec, CodecOutput
from src.errors import ConfigError, LicError
from src.lightning_modules.ema import ema_update
from src.lightning_modules.rate_distortion import (
    OptimizerFactory,
    RateDistortion,
    SchedulerFactory,
)
from src.losses.rate_distortion import RDTerms

log = logging.getLogger(__name__)

# The spike guard judges a norm only once it has seen this many.
SPIKE_MIN_HISTORY = 10


def compressai_lmbda(lmbda: float) -> float:
    """CompressAI's λ (bpp + λ·255²·MSE on [0, 1]) equivalent to the paper's λ.

    The paper minimises nats/sub-pixel + λ·MSE_[-1,1]; times 3/ln 2 that is
    bpp + (12 λ / ln 2)·MSE_[0,1], so λ_CompressAI = 12 λ / (255² ln 2) ≈ 2.6624e-4 · λ.
    """
    return 12 * lmbda / (255**2 * math.log(2))


class QResLoss:
    """The paper's objective in its own units, with bpp and MSE on [0, 1] alongside."""

    def __init__(self, lmbda: float) -> None:
        self.lmbda = float(lmbda)

    def __call__(self, x: Tensor, out: CodecOutput) -> RDTerms:
        b, c, h, w = x.shape
        bits = out.total_bits()
        nats_per_dim = bits * math.log(2) / (c * h * w)
        mse = (x - out.x_hat).pow(2).mean()
        mse_pm1 = 4 * mse  # images on [-1, 1]
        loss = nats_per_dim.mean() + self.lmbda * mse_pm1
        return RDTerms(loss=loss, bpp=bits.sum() / (b * h * w), distortion=mse_pm1, mse=mse)


class QResVAETraining(RateDistortion):
    """Train a QRes-VAE on the paper's loss with EMA weights and a gradient-spike guard.

    Args:
        codec: a `QResVAE`.
        lmbda: λ in the paper's convention (16 ... 2048 natural images, 1 ... 64 CelebA); 0 for
            the lossless model. `compressai_lmbda` converts it to CompressAI's convention.
        optimizer, scheduler, scheduler_interval, scheduler_monitor, num_logged_images: as in
            `RateDistortion`.
        metric: "mse" (lossy) or "nll" (lossless); it names the run.
        clip_max_norm: gradient-norm clip (the paper's 2.0; 0 disables it).
        ema_decay: the EMA's decay; it warms up as decay·(1 - exp(-step / ema_warmup_steps)).
        spike_factor, spike_window: a step is a spike when its gradient norm exceeds
            spike_factor × the median of the last spike_window norms (or is not finite).
        spike_lr_scale: 0 skips a spike step; > 0 takes it at this fraction of the learning rate
            (the reference's 0.1). Either way the EMA skips it.
    """

    def __init__(
        self,
        codec: Codec,
        lmbda: float,
        optimizer: OptimizerFactory,
        metric: str = "mse",
        quality: int | None = None,
        scheduler: SchedulerFactory | None = None,
        scheduler_interval: str = "step",
        scheduler_monitor: str = "val/loss",
        clip_max_norm: float = 2.0,
        num_logged_images: int = 2,
        ema_decay: float = 0.9999,
        ema_warmup_steps: int = 10000,
        spike_factor: float = 10.0,
        spike_window: int = 100,
        spike_lr_scale: float = 0.0,
    ) -> None:
        lossless = bool(getattr(codec, "lossless", False))
        expected = "nll" if lossless else "mse"
        if metric != expected:
            raise ConfigError(
                f"model.metric must be {expected!r} for {codec.name} (QRes-VAE trains on MSE, "
                f"its lossless model on NLL), got {metric!r}"
            )
        if lossless and lmbda:
            raise ConfigError(f"{codec.name} has no rate-distortion trade-off; set model.lmbda=0")
        if not lossless and not (lmbda and lmbda > 0):
            raise ConfigError(f"model.lmbda must be positive, got {lmbda}")
        if not 0 <= ema_decay < 1 or ema_warmup_steps <= 0:
            raise ConfigError("model.ema_decay must be in [0, 1) and ema_warmup_steps positive")
        if spike_factor <= 1 or spike_window < SPIKE_MIN_HISTORY or not 0 <= spike_lr_scale < 1:
            raise ConfigError(
                f"model.spike_factor must exceed 1, spike_window be at least {SPIKE_MIN_HISTORY} "
                "and spike_lr_scale in [0, 1)"
            )
        # The base class checks a CompressAI-style λ; its loss is replaced just below.
        super().__init__(
            codec,
            lmbda=lmbda or 1.0,
            optimizer=optimizer,
            quality=quality,
            scheduler=scheduler,
            scheduler_interval=scheduler_interval,
            scheduler_monitor=scheduler_monitor,
            clip_max_norm=clip_max_norm,
            num_logged_images=num_logged_images,
        )
        self.hparams.update(
            lmbda=lmbda,
            metric=metric,
            ema_decay=ema_decay,
            ema_warmup_steps=ema_warmup_steps,
            spike_factor=spike_factor,
            spike_window=spike_window,
            spike_lr_scale=spike_lr_scale,
        )
        self.rd_loss = QResLoss(lmbda)
        # `online` is trained; `codec` (the EMA) is validated, checkpointed and exported.
        self.online = self.codec
        self.codec = copy.deepcopy(codec).requires_grad_(False)
        self.grad_norms: deque[float] = deque(maxlen=spike_window)
        self.skipped_steps = 0
        self._consecutive_skips = 0

    # ---- optimisation -------------------------------------------------------------------------
    def configure_optimizers(self) -> Any:
        optimizer = self.optimizer_factory([{"params": list(self.online.parameters())}])
        if self.scheduler_factory is None:
            return optimizer
        scheduler = {
            "scheduler": self.scheduler_factory(optimizer),
            "interval": self.hparams.scheduler_interval,
            "monitor": self.hparams.scheduler_monitor,
        }
        return [optimizer], [scheduler]

    def ema_decay_at(self, step: int) -> float:
        """The EMA decay after `step` optimiser steps (warming up from 0)."""
        warm = 1 - math.exp(-step / self.hparams.ema_warmup_steps)
        return self.hparams.ema_decay * warm

    @torch.no_grad()
    def update_ema(self, step: int) -> None:
        """Move the EMA weights towards the online weights (the codec has no running buffers)."""
        ema_update(self.codec, self.online, self.ema_decay_at(step))

    def is_spike(self, norm: float) -> bool:
        """Whether a gradient norm is not finite or far above the recent median."""
        if not math.isfinite(norm):
            return True
        if len(self.grad_norms) < SPIKE_MIN_HISTORY:
            return False
        return norm > self.hparams.spike_factor * statistics.median(self.grad_norms)

    def training_step(self, batch: Tensor, batch_idx: int) -> Tensor:
        optimizer = self.optimizers()
        out = self.online(batch)
        terms = self.rd_loss(batch, out)
        optimizer.zero_grad()
        self.manual_backward(terms.loss)
        max_norm = self.hparams.clip_max_norm if self.hparams.clip_max_norm > 0 else math.inf
        norm = float(torch.nn.utils.clip_grad_norm_(self.online.parameters(), max_norm))

        spike = self.is_spike(norm)
        if math.isfinite(norm):
            self.grad_norms.append(norm)
        if spike:
            stepped = self._handle_spike(optimizer, norm, terms.loss)
        else:
            self._consecutive_skips = 0
            optimizer.step()
            self.update_ema(self.global_step)
            stepped = True
        if stepped and self.scheduler_factory is not None:
            if self.hparams.scheduler_interval == "step":
                self.lr_schedulers().step()

        if self.global_step % self.trainer.log_every_n_steps == 0:
            self.log_dict(
                {
                    "train/loss": terms.loss.detach(),
                    "train/bpp": terms.bpp.detach(),
                    "train/mse": terms.mse.detach(),
                    "train/grad_norm": torch.tensor(norm),
                    "train/skipped_steps": torch.tensor(float(self.skipped_steps)),
                    "train/lr": torch.tensor(optimizer.optimizer.param_groups[0]["lr"]),
                },
                on_step=True,
                on_epoch=False,
            )
            self.log("bpp", terms.bpp.detach(), prog_bar=True, on_step=True, logger=False)
        return terms.loss.detach()

    def _handle_spike(self, optimizer: Any, norm: float, loss: Tensor) -> bool:
        """Skip a spike step, or take it at a reduced rate (returns True then); the EMA never
        sees it."""
        self.skipped_steps += 1
        self._consecutive_skips += 1
        scale = self.hparams.spike_lr_scale
        log.warning(
            "gradient spike at step %d (norm %.4g, loss %.4g): %s",
            self.global_step,
            norm,
            float(loss.detach()),
            f"step taken at {scale:g}x the learning rate"
            if scale > 0 and math.isfinite(norm)
            else "step skipped",
        )
        if self._consecutive_skips >= self.hparams.spike_window:
            raise LicError(
                f"training diverged: {self._consecutive_skips} consecutive gradient spikes "
                f"(last norm {norm:.4g}); resume from an earlier checkpoint with a lower lr"
            )
        if scale > 0 and math.isfinite(norm):
            groups = optimizer.optimizer.param_groups
            rates = [g["lr"] for g in groups]
            for g in groups:
                g["lr"] *= scale
            optimizer.step()
            for g, lr in zip(groups, rates):
                g["lr"] = lr
            return True
        optimizer.zero_grad()
        return False

    # ---- checkpoints --------------------------------------------------------------------------
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        super().on_save_checkpoint(checkpoint)
        checkpoint["qres_guard"] = {
            "grad_norms": list(self.grad_norms),
            "skipped_steps": self.skipped_steps,
        }

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        guard = checkpoint.get("qres_guard", {})
        self.grad_norms.extend(guard.get("grad_norms", []))
        self.skipped_steps = int(guard.get("skipped_steps", 0))
