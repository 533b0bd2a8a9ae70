"""The QRes-VAE training recipe: the paper's loss, EMA weights, clipping and a gradient-spike guard.

Loss (Duan et al.): rate in nats per sub-pixel + λ · MSE of images on [-1, 1] (or, as an option,
λ · (1 − MS-SSIM)); the lossless model has no λ (its rate includes the pixels). The optimiser
trains `online`; `codec` holds the exponential moving average of its weights, and is what every
checkpoint stores as the codec (so `load_codec`, `evaluate.py` and the CLI use the EMA weights,
like the paper's released models). With `validate_plain`, validation measures both, as the
reference does, and checkpoints keep the better of the two as the codec.

The spike guard follows the reference's training loop by default: every gradient norm (before
clipping, on unscaled gradients) joins a window of the last `spike_window` norms, and a norm above
`spike_factor` × the window's median (itself included) makes the step a spike from the very first
step on. A spike is taken at `spike_lr_scale` × the learning rate, and that reduction stays (and
compounds with further spikes) until the step count next reaches a multiple of `spike_lr_hold`,
where the reference resets its learning rate. A spike never updates the EMA. Non-finite norms
skip the step (under a 16-bit grad scaler, the scaler skips it and lowers its scale).
"""

from __future__ import annotations

import copy
import logging
import math
import statistics
from collections import deque
from pathlib import Path
from typing import Any

import torch
from torch import Tensor
from torchmetrics import MeanMetric

from src.codecs.base import Codec, CodecOutput
from src.errors import ConfigError, LicError
from src.lightning_modules.ema import ema_update
from src.lightning_modules.rate_distortion import (
    OptimizerFactory,
    RateDistortion,
    SchedulerFactory,
)
from src.losses.rate_distortion import RDTerms, ms_ssim_distortion
from src.utils.checkpoints import load_checkpoint_weights, read_checkpoint

log = logging.getLogger(__name__)

LOSSY_METRICS = ("mse", "ms-ssim")
VAL_NAMES = ("loss", "bpp", "mse", "psnr", "ms_ssim")


def compressai_lmbda(lmbda: float, metric: str = "mse") -> float:
    """CompressAI's λ (bpp + λ·D) equivalent to the paper's λ (nats/sub-pixel + λ·D').

    Times 3/ln 2 the paper's loss is in bits per pixel. For MSE, D' = MSE on [-1, 1] = 4·MSE on
    [0, 1] and CompressAI's D = 255²·MSE, so λ_CompressAI = 12 λ / (255² ln 2) ≈ 2.6624e-4 · λ;
    for MS-SSIM both use 1 − MS-SSIM, so λ_CompressAI = 3 λ / ln 2 ≈ 4.328 · λ.
    """
    if metric == "ms-ssim":
        return 3 * lmbda / math.log(2)
    return 12 * lmbda / (255**2 * math.log(2))


class QResLoss:
    """The paper's objective in its own units, with bpp and MSE on [0, 1] alongside.

    `metric` "mse": λ · MSE on [-1, 1] images; "ms-ssim": λ · (1 − MS-SSIM); "nll": the rate
    alone (the lossless model's bits include its pixels)."""

    def __init__(self, lmbda: float, metric: str = "mse") -> None:
        self.lmbda = float(lmbda)
        self.metric = metric

    def __call__(self, x: Tensor, out: CodecOutput) -> RDTerms:
        b, c, h, w = x.shape
        bits = out.total_bits()
        nats_per_dim = bits * math.log(2) / (c * h * w)
        mse = (x - out.x_hat).pow(2).mean()
        if self.metric == "ms-ssim":
            distortion = ms_ssim_distortion(x, out.x_hat)
        else:
            distortion = 4 * mse  # images on [-1, 1]
        loss = nats_per_dim.mean() + self.lmbda * distortion
        return RDTerms(loss=loss, bpp=bits.sum() / (b * h * w), distortion=distortion, mse=mse)


class QResVAETraining(RateDistortion):
    """Train a QRes-VAE on the paper's loss with EMA weights and a gradient-spike guard.

    Args:
        codec: a `QResVAE`.
        lmbda: λ in the paper's convention (MSE: 16 ... 2048 natural images, 1 ... 64 CelebA);
            0 for the lossless model. `compressai_lmbda` converts it to CompressAI's convention.
        optimizer, scheduler, scheduler_interval, scheduler_monitor, num_logged_images: as in
            `RateDistortion`.
        metric: "mse" or "ms-ssim" (lossy), "nll" (lossless).
        clip_max_norm: gradient-norm clip (the paper's 2.0; 0 disables it).
        ema_decay: the EMA's decay; it warms up as decay·(1 - exp(-step / ema_warmup_steps)).
        validate_plain: validate the online weights beside the EMA ones and keep the better as
            the checkpoint's codec (the reference validates both).
        spike_factor, spike_window: a step is a spike when its gradient norm exceeds
            spike_factor × the median of the last spike_window norms (or is not finite).
        spike_include_current: the median's window includes the norm being judged (reference).
        spike_min_history: norms in the window before any is judged (1: from the first step).
        spike_lr_scale: a spike step is taken at this fraction of the learning rate (the
            reference's 0.1); 0 skips spike steps instead.
        spike_lr_hold: the reduced rate holds until the step count reaches a multiple of this
            (the reference resets its rate every 10 steps); 1 restores it after the spike step.
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
        validate_plain: bool = False,
        spike_factor: float = 10.0,
        spike_window: int = 100,
        spike_include_current: bool = True,
        spike_min_history: int = 1,
        spike_lr_scale: float = 0.1,
        spike_lr_hold: int = 10,
    ) -> None:
        lossless = bool(getattr(codec, "lossless", False))
        if lossless and metric != "nll":
            raise ConfigError(f"model.metric must be 'nll' for {codec.name}, got {metric!r}")
        if not lossless and metric not in LOSSY_METRICS:
            raise ConfigError(
                f"model.metric must be one of {LOSSY_METRICS} for {codec.name}, got {metric!r}"
            )
        if lossless and lmbda:
            raise ConfigError(f"{codec.name} has no rate-distortion trade-off; set model.lmbda=0")
        if not lossless and not (lmbda and lmbda > 0):
            raise ConfigError(f"model.lmbda must be positive, got {lmbda}")
        if not 0 <= ema_decay < 1 or ema_warmup_steps <= 0:
            raise ConfigError("model.ema_decay must be in [0, 1) and ema_warmup_steps positive")
        if (
            spike_factor <= 1
            or not 1 <= spike_min_history <= spike_window
            or not 0 <= spike_lr_scale < 1
            or spike_lr_hold < 1
        ):
            raise ConfigError(
                "model.spike_factor must exceed 1, spike_min_history be in 1..spike_window, "
                "spike_lr_scale in [0, 1) and spike_lr_hold at least 1"
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
            validate_plain=validate_plain,
            spike_factor=spike_factor,
            spike_window=spike_window,
            spike_include_current=spike_include_current,
            spike_min_history=spike_min_history,
            spike_lr_scale=spike_lr_scale,
            spike_lr_hold=spike_lr_hold,
        )
        self.rd_loss = QResLoss(lmbda, metric)
        # `online` is trained; `codec` (the EMA) is validated, checkpointed and exported.
        self.online = self.codec
        self.codec = copy.deepcopy(codec).requires_grad_(False)
        self.plain_metrics = torch.nn.ModuleDict({n: MeanMetric() for n in VAL_NAMES})
        self.kept = "ema"  # which weights the last validation found better
        self.grad_norms: deque[float] = deque(maxlen=spike_window)
        self.skipped_steps = 0
        self.spike_steps = 0
        self.lr_factor = 1.0
        self._consecutive_spikes = 0

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

    def observe_norm(self, norm: float) -> bool:
        """Record a gradient norm and say whether it is a spike: not finite, or above
        spike_factor × the median of the window (which holds this norm too by default)."""
        if not math.isfinite(norm):
            return True
        if self.hparams.spike_include_current:
            self.grad_norms.append(norm)
        spike = len(self.grad_norms) >= self.hparams.spike_min_history and norm > (
            self.hparams.spike_factor * statistics.median(self.grad_norms)
        )
        if not self.hparams.spike_include_current:
            self.grad_norms.append(norm)
        return spike

    def grad_scale(self) -> float:
        """The loss scale of a 16-bit mixed-precision run's grad scaler (1 without one)."""
        scaler = getattr(self.trainer.precision_plugin, "scaler", None) if self._trainer else None
        return float(scaler.get_scale()) if scaler is not None and scaler.is_enabled() else 1.0

    def unscaled_clip(self, scale: float) -> float:
        """Clip the online gradients to `clip_max_norm` as if they were unscaled, and return
        their unscaled norm (gradients of a grad-scaled run are `scale` times too large; the
        scaler itself unscales them in its step)."""
        max_norm = self.hparams.clip_max_norm if self.hparams.clip_max_norm > 0 else math.inf
        params = self.online.parameters()
        return float(torch.nn.utils.clip_grad_norm_(params, max_norm * scale)) / scale

    def training_step(self, batch: Tensor, batch_idx: int) -> Tensor:
        optimizer = self.optimizers()
        out = self.online(batch)
        terms = self.rd_loss(batch, out)
        optimizer.zero_grad()
        self.manual_backward(terms.loss)
        scale = self.grad_scale()
        norm = self.unscaled_clip(scale)
        stepped = self.guarded_step(optimizer, norm, terms.loss, self.global_step, scale != 1.0)
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
                    "train/spike_steps": torch.tensor(float(self.spike_steps)),
                    "train/lr": torch.tensor(
                        optimizer.optimizer.param_groups[0]["lr"] * self.lr_factor
                    ),
                },
                on_step=True,
                on_epoch=False,
            )
            self.log("bpp", terms.bpp.detach(), prog_bar=True, on_step=True, logger=False)
        return terms.loss.detach()

    def guarded_step(
        self, optimizer: Any, norm: float, loss: Tensor, step: int, scaled: bool = False
    ) -> bool:
        """Step `optimizer` (Lightning's wrapper) on gradients of norm `norm` at training step
        `step`, as the spike guard decides; returns whether a step was taken. `scaled`: the
        gradients are a 16-bit grad scaler's."""
        if step % self.hparams.spike_lr_hold == 0:
            self.lr_factor = 1.0  # where the reference resets its learning rate
        if self.observe_norm(norm):
            return self._handle_spike(optimizer, norm, loss, scaled)
        self._consecutive_spikes = 0
        self._step_at(optimizer, self.lr_factor)
        self.update_ema(step)
        return True

    @staticmethod
    def _step_at(optimizer: Any, factor: float) -> None:
        """One optimiser step at `factor` × every group's learning rate (the scheduler's rates
        are left as they were, so no schedule ever sees the reduction)."""
        groups = optimizer.optimizer.param_groups
        rates = [g["lr"] for g in groups]
        for g in groups:
            g["lr"] *= factor
        try:
            optimizer.step()
        finally:
            for g, lr in zip(groups, rates):
                g["lr"] = lr

    def _handle_spike(self, optimizer: Any, norm: float, loss: Tensor, scaled: bool) -> bool:
        """Take a spike step at a reduced rate, or skip it; returns whether a step was taken.
        The EMA never sees it."""
        self.spike_steps += 1
        self._consecutive_spikes += 1
        if self._consecutive_spikes >= self.hparams.spike_window:
            raise LicError(
                f"training diverged: {self._consecutive_spikes} consecutive gradient spikes "
                f"(last norm {norm:.4g}); resume from an earlier checkpoint with a lower lr"
            )
        reduce = self.hparams.spike_lr_scale > 0 and math.isfinite(norm)
        if reduce:
            self.lr_factor *= self.hparams.spike_lr_scale
        else:
            self.skipped_steps += 1
        log.warning(
            "gradient spike at step %d (norm %.4g, loss %.4g): %s",
            self.global_step,
            norm,
            float(loss.detach()),
            f"step taken at {self.lr_factor:g}x the learning rate" if reduce else "step skipped",
        )
        if reduce:
            self._step_at(optimizer, self.lr_factor)
            return True
        if scaled and not math.isfinite(norm):
            optimizer.step()  # the grad scaler skips the update and lowers its scale
            return False
        optimizer.zero_grad()
        return False

    # ---- validation ---------------------------------------------------------------------------
    def validation_step(self, batch: Tensor, batch_idx: int) -> None:
        super().validation_step(batch, batch_idx)
        if self.hparams.validate_plain:
            self.validate_batch(batch, self.online, self.plain_metrics)

    def on_validation_epoch_end(self) -> None:
        if not self.hparams.validate_plain:
            return super().on_validation_epoch_end()
        results = {}
        for kind, metrics in (("ema", self.val_metrics), ("plain", self.plain_metrics)):
            results[kind] = {n: m.compute() for n, m in metrics.items() if m.update_count > 0}
            for metric in metrics.values():
                metric.reset()
        if "loss" not in results["ema"] or "loss" not in results["plain"]:
            return  # no validation batch was seen
        self.kept = "plain" if results["plain"]["loss"] < results["ema"]["loss"] else "ema"
        for kind, values in results.items():
            for name, value in values.items():
                self.log(f"val/{kind}/{name}", value, sync_dist=True)
        for name, value in results[self.kept].items():  # val/loss: the better, as kept
            self.log(f"val/{name}", value, prog_bar=name == "psnr", sync_dist=True)
        self.log("val/kept_plain", float(self.kept == "plain"), sync_dist=True)

    # ---- checkpoints --------------------------------------------------------------------------
    def init_weights_from(self, path: str | Path) -> None:
        """`ckpt=`: start from a checkpoint's weights. One holding a codec alone (`lic import`,
        any other run's export) starts both the online and the EMA weights from it."""
        checkpoint = read_checkpoint(path)
        state = dict(checkpoint["state_dict"])
        if not any(k.startswith("online.") for k in state):
            state.update({f"online.{k[6:]}": v for k, v in state.items() if k.startswith("codec.")})
        state.update(checkpoint.get("qres_ema_state", {}))  # a run that kept its plain weights
        load_checkpoint_weights(self, {**checkpoint, "state_dict": state}, f"checkpoint {path}")

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        super().on_save_checkpoint(checkpoint)
        if self.kept == "plain":  # the codec is the online weights; the EMA travels beside it
            state = checkpoint["state_dict"]
            checkpoint["qres_ema_state"] = {
                k: v for k, v in state.items() if k.startswith("codec.")
            }
            self.online.prepare_for_coding()
            state.update(self.online.state_dict(prefix="codec."))
        checkpoint["qres_guard"] = {
            "grad_norms": list(self.grad_norms),
            "skipped_steps": self.skipped_steps,
            "spike_steps": self.spike_steps,
            "lr_factor": self.lr_factor,
            "kept": self.kept,
        }

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        # Runs before the state dict is loaded: put the EMA back where training keeps it.
        checkpoint["state_dict"].update(checkpoint.pop("qres_ema_state", {}))
        guard = checkpoint.get("qres_guard", {})
        self.grad_norms.extend(guard.get("grad_norms", []))
        self.skipped_steps = int(guard.get("skipped_steps", 0))
        self.spike_steps = int(guard.get("spike_steps", 0))
        self.lr_factor = float(guard.get("lr_factor", 1.0))
        self.kept = str(guard.get("kept", "ema"))
