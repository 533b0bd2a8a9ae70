"""McQuic's training recipe: distortion only, an annealed Gumbel temperature, codeword reassignment.

The generic rate-distortion recipe does the optimisation (manual, clipped, with its schedulers,
validation and coding-ready checkpoints); this subclass changes these things:

- the loss is the distortion alone (MSE on McQuic's [-1, 1] scale, i.e. 4·MSE, or 1 − MS-SSIM):
  the rate is fixed by m and the codebook sizes, so there is no λ;
- before every training step the temperature schedule sets the codec's Gumbel temperature, logged
  as `train/temperature`;
- every `reassign_every` epochs (or steps) rank 0 re-seeds the dead codewords of every codebook
  and broadcasts the codebooks; the fraction moved is logged as `train/reassigned`;
- training batches go through the official augmentations (`augment`), and for the first
  `erase_epochs` epochs the codec sees them patch-erased (`erasing`) while the loss compares with
  the clean batch;
- validation logs how the codes are used per level (`val/code_usage/levelN`, the share of
  codewords the validation images use; `val/code_usage_ema/levelN`, the share the training EMA
  keeps alive; a histogram of per-codeword counts on TensorBoard) and `val/ideal_bpp`, the
  empirical entropy of the validation codes (the official `IdealBPP`).

The code-frequency EMA itself is updated by the codec's training forward pass, all-reduced over
the DDP ranks.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor
from torchmetrics import Metric

from src.codecs.mcquic import REASSIGN_SOURCES, McQuic
from src.datamodules.augment import Augment, PatchErasing
from src.errors import ConfigError
from src.lightning_modules.rate_distortion import OptimizerFactory, RateDistortion, SchedulerFactory
from src.lightning_modules.temperature import Constant, TemperatureSchedule
from src.losses.rate_distortion import RateDistortionLoss, RDTerms


class DistortionLoss(RateDistortionLoss):
    """The distortion alone: 4·MSE (MSE of images on [-1, 1]) or 1 − MS-SSIM. bpp is reported,
    detached, for the logs."""

    def __init__(self, metric: str = "mse") -> None:
        super().__init__(lmbda=1.0, metric=metric)

    def __call__(self, x: Tensor, out: Any) -> RDTerms:
        terms = super().__call__(x, out)
        distortion = 4 * terms.mse if self.metric == "mse" else terms.distortion
        return RDTerms(
            loss=distortion, bpp=terms.bpp.detach(), distortion=distortion, mse=terms.mse
        )


class McQuicRecipe(RateDistortion):
    """Train a `McQuic` codec (see the module docstring).

    Args:
        codec: the McQuic codec.
        optimizer: partial of the optimiser (LAMB in the paper's recipe).
        m: sub-codebooks per level; recorded with the run (the codec config uses it).
        metric: "mse" or "ms-ssim".
        temperature: the Gumbel temperature schedule (constant 1 when None).
        reassign_every: re-seed dead codewords every this many units (0 disables it).
        reassign_unit: "epoch" or "step".
        dead_threshold: EMA frequency under which a codeword counts as dead.
        reassign_from: "random" (exact copies of random live codewords, the official code) or
            "most_used" (jittered copies of the most used ones).
        augment: batch augmentations of the training images (None: none).
        erasing: patch erasing of the codec's training input (None: none).
        erase_epochs: erase during the first this many epochs (None: the whole run).
        scheduler, scheduler_interval, scheduler_monitor, clip_max_norm, num_logged_images: as in
            `RateDistortion`.
    """

    def __init__(
        self,
        codec: McQuic,
        optimizer: OptimizerFactory,
        m: int | None = None,
        metric: str = "mse",
        temperature: TemperatureSchedule | None = None,
        reassign_every: int = 10,
        reassign_unit: str = "epoch",
        dead_threshold: float = 1e-6,
        reassign_from: str = "random",
        augment: Augment | None = None,
        erasing: PatchErasing | None = None,
        erase_epochs: int | None = None,
        scheduler: SchedulerFactory | None = None,
        scheduler_interval: str = "epoch",
        scheduler_monitor: str = "val/loss",
        clip_max_norm: float = 1.0,
        num_logged_images: int = 2,
    ) -> None:
        if not isinstance(codec, McQuic):
            raise ConfigError(f"McQuicRecipe trains a McQuic codec, got {type(codec).__name__}")
        if m is not None and m != codec.m:
            raise ConfigError(f"model.m={m} but the codec was built with m={codec.m}")
        if reassign_unit not in ("epoch", "step") or reassign_every < 0:
            raise ConfigError(
                "model.reassign_unit must be 'epoch' or 'step' and model.reassign_every ≥ 0, "
                f"got {reassign_unit!r} and {reassign_every}"
            )
        if reassign_from not in REASSIGN_SOURCES:
            raise ConfigError(
                f"model.reassign_from must be one of {REASSIGN_SOURCES}, got {reassign_from!r}"
            )
        super().__init__(
            codec=codec,
            lmbda=1.0,
            optimizer=optimizer,
            metric=metric,
            scheduler=scheduler,
            scheduler_interval=scheduler_interval,
            scheduler_monitor=scheduler_monitor,
            clip_max_norm=clip_max_norm,
            num_logged_images=num_logged_images,
        )
        # Plain values only in the checkpoint (the schedule object is rebuilt from the config).
        self.save_hyperparameters(
            ignore=["codec", "optimizer", "scheduler", "temperature", "augment", "erasing"],
            logger=False,
        )
        self.rd_loss = DistortionLoss(metric)
        self.temperature = temperature if temperature is not None else Constant(1.0)
        self.augment = augment
        self.erasing = erasing
        self.code_usage = CodeUsage(codec)

    # ---- training inputs ----------------------------------------------------------------------
    def training_pair(self, batch: Tensor) -> tuple[Tensor, Tensor]:
        """The augmented batch as the target; the codec sees it patch-erased while erasing is on."""
        clean = self.augment(batch) if self.augment is not None else batch
        until = self.hparams.erase_epochs
        if self.erasing is not None and (until is None or self.current_epoch < until):
            return self.erasing(clean), clean
        return clean, clean

    # ---- temperature --------------------------------------------------------------------------
    def schedule_position(self, unit: str, batch_idx: int = 0) -> float:
        """Where training is, in epochs (fractional within the epoch) or in optimiser steps."""
        if unit == "step":
            return float(self.global_step)
        per_epoch = self.trainer.num_training_batches
        within = batch_idx / per_epoch if per_epoch and per_epoch != float("inf") else 0.0
        return self.current_epoch + within

    def on_train_batch_start(self, batch: Tensor, batch_idx: int) -> None:
        value = self.temperature(self.schedule_position(self.temperature_unit, batch_idx))
        self.codec.set_temperature(value)

    @property
    def temperature_unit(self) -> str:
        return getattr(self.temperature, "unit", "step")

    def on_train_batch_end(self, outputs: Any, batch: Tensor, batch_idx: int) -> None:
        if self.global_step % self.trainer.log_every_n_steps == 0:
            self.log("train/temperature", self.codec.temperature, on_step=True, on_epoch=False)
        every = self.hparams.reassign_every
        if self.hparams.reassign_unit == "step" and every and self.global_step % every == 0:
            self.reassign_dead_codewords()

    def on_train_epoch_end(self) -> None:
        super().on_train_epoch_end()
        every = self.hparams.reassign_every
        if (
            self.hparams.reassign_unit == "epoch"
            and every
            and (self.current_epoch + 1) % every == 0
        ):
            self.reassign_dead_codewords()

    # ---- validation: how the codes are used ---------------------------------------------------
    def validate_batch(self, batch: Tensor) -> tuple[Any, Tensor]:
        out, x_hat = super().validate_batch(batch)
        self.code_usage.update(
            out.extras["codes"], batch.shape[0] * batch.shape[-2] * batch.shape[-1]
        )
        return out, x_hat

    def on_validation_epoch_end(self) -> None:
        super().on_validation_epoch_end()
        if self.code_usage.update_count == 0:
            return
        counts, ideal_bpp = self.code_usage.compute()
        log = {"val/ideal_bpp": ideal_bpp}
        for level, (count, quantizer) in enumerate(zip(counts, self.codec.quantizers), start=1):
            log[f"val/code_usage/level{level}"] = (count > 0).float().mean()
            alive = quantizer.frequency >= self.hparams.dead_threshold
            log[f"val/code_usage_ema/level{level}"] = alive.float().mean()
            for logger in self.loggers:
                if hasattr(getattr(logger, "experiment", None), "add_histogram"):
                    logger.experiment.add_histogram(
                        f"val/code_counts/level{level}", count.flatten(), self.global_step
                    )
        self.log_dict(log, sync_dist=True)
        self.code_usage.reset()

    # ---- codeword reassignment ----------------------------------------------------------------
    def reassign_dead_codewords(self) -> dict[str, float]:
        """Re-seed dead codewords (rank 0, broadcast) and log the fraction moved."""
        fractions = reassign_on_rank_zero(
            self.codec, self.hparams.dead_threshold, self.hparams.reassign_from
        )
        names = {
            k: "train/reassigned" if k == "all" else f"train/reassigned/{k}" for k in fractions
        }
        self.log_dict({names[k]: v for k, v in fractions.items()}, on_step=False, on_epoch=True)
        return fractions


def reassign_on_rank_zero(
    codec: McQuic, threshold: float, source: str = "random"
) -> dict[str, float]:
    """Rank 0 re-seeds the dead codewords; every DDP rank then takes rank 0's codebooks and
    fractions (per level and "all"). Without torch.distributed this is a plain reassignment."""
    keys = [f"level{i + 1}" for i in range(codec.levels)] + ["all"]
    device = codec.codebooks()[0].device
    values = torch.zeros(len(keys), device=device)
    distributed = dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1
    if not distributed or dist.get_rank() == 0:
        fractions = codec.reassign_dead_codewords(threshold, source=source)
        values = torch.tensor([fractions[k] for k in keys], device=device)
    if distributed:
        for codebook in codec.codebooks():
            dist.broadcast(codebook.data, src=0)
        dist.broadcast(values, src=0)
    return dict(zip(keys, values.tolist()))


class CodeUsage(Metric):
    """Code histograms of every level over a validation pass, summed over DDP ranks.

    `compute()` gives the per-level counts (m, k) and the ideal bpp: the bits an entropy coder
    needs under the validation set's own code frequencies, Σ_levels Σ_m H(p_m) · n_m / pixels."""

    full_state_update = False

    def __init__(self, codec: McQuic) -> None:
        super().__init__()
        self.levels = codec.levels
        for level, k in enumerate(codec.codebook_sizes):
            self.add_state(f"counts{level}", torch.zeros(codec.m, k), dist_reduce_fx="sum")
        self.add_state("pixels", torch.zeros(()), dist_reduce_fx="sum")

    def update(self, codes: list[Tensor], pixels: int) -> None:
        for level, c in enumerate(codes):
            counts = getattr(self, f"counts{level}")
            flat = c.transpose(0, 1).reshape(c.shape[1], -1)
            counts.scatter_add_(1, flat, torch.ones_like(flat, dtype=counts.dtype))
        self.pixels += pixels

    def compute(self) -> tuple[list[Tensor], Tensor]:
        counts = [getattr(self, f"counts{level}") for level in range(self.levels)]
        bits = sum(
            -(c * torch.log2(c / c.sum(-1, keepdim=True)).nan_to_num(0.0, 0.0, 0.0)).sum()
            for c in counts
        )
        return counts, bits / self.pixels
