"""The generic rate-distortion training recipe for any `Codec`.

Manual optimisation: the main optimiser (with an optional separate learning rate for the entropy
models' density parameters) takes bpp + λ·D, gradients clipped inside the module; CompressAI's
auxiliary optimiser fits the quantiles on `codec.aux_loss()`. The auxiliary step goes to the raw
optimiser so `trainer.global_step` counts batches, not optimiser calls, and `max_steps` means
what a user expects.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch
from torch import Tensor
from torch.optim import Optimizer
from torchmetrics import MeanMetric

from src.codecs.base import Codec, CodecOutput
from src.codecs.loading import store_codec
from src.errors import ConfigError
from src.evaluation.metrics import ms_ssim, psnr, quantize_8bit
from src.losses.rate_distortion import RateDistortionLoss
from src.utils.checkpoints import load_weights
from src.utils.image_logging import log_reconstructions

OptimizerFactory = Callable[..., Optimizer]
SchedulerFactory = Callable[[Optimizer], Any]


class RateDistortion(pl.LightningModule):
    """Train a codec on bpp + λ·D.

    Args:
        codec: the network, any `Codec`.
        lmbda: the rate-distortion trade-off λ.
        metric: "mse" (D = 255²·MSE) or "ms-ssim" (D = 1 − MS-SSIM).
        quality: the preset's quality level; recorded with the run (it already chose λ and widths).
        optimizer: partial of a torch optimiser for the main parameters.
        aux_optimizer: partial of a torch optimiser for the auxiliary parameters (quantiles).
        scheduler: partial of an LR scheduler over the main optimiser, or None.
        scheduler_interval: "step" or "epoch".
        scheduler_monitor: metric a plateau scheduler watches.
        entropy_lr_scale: learning-rate multiplier for the entropy models' density parameters.
        clip_max_norm: gradient-norm clip of the main parameters (0 disables it).
        num_logged_images: reconstructions logged at each validation.
    """

    def __init__(
        self,
        codec: Codec,
        lmbda: float,
        optimizer: OptimizerFactory,
        metric: str = "mse",
        quality: int | None = None,
        aux_optimizer: OptimizerFactory | None = None,
        scheduler: SchedulerFactory | None = None,
        scheduler_interval: str = "step",
        scheduler_monitor: str = "val/loss",
        entropy_lr_scale: float = 1.0,
        clip_max_norm: float = 1.0,
        num_logged_images: int = 2,
    ) -> None:
        super().__init__()
        if scheduler_interval not in ("step", "epoch"):
            raise ConfigError(
                f"model.scheduler_interval must be 'step' or 'epoch', got {scheduler_interval!r}"
            )
        # Plain values only: checkpoints stay loadable with torch.load(weights_only=True).
        self.save_hyperparameters(
            ignore=["codec", "optimizer", "aux_optimizer", "scheduler"], logger=False
        )
        self.optimizer_factory = optimizer
        self.aux_optimizer_factory = aux_optimizer
        self.scheduler_factory = scheduler
        self.automatic_optimization = False
        self.codec = codec
        self.rd_loss = RateDistortionLoss(lmbda, metric)
        self.val_metrics = torch.nn.ModuleDict(
            {name: MeanMetric() for name in ("loss", "bpp", "mse", "psnr", "ms_ssim")}
        )

    # ---- optimisation -------------------------------------------------------------------------
    def configure_optimizers(self) -> Any:
        aux_ids = {id(p) for p in self.codec.aux_parameters()}
        entropy = [p for p in self.codec.entropy_parameters() if id(p) not in aux_ids]
        entropy_ids = {id(p) for p in entropy}
        main = [p for p in self.main_parameters() if id(p) not in aux_ids | entropy_ids]
        base_lr = self.optimizer_factory.keywords.get("lr", 1e-4)
        groups = [{"params": main, "name": "main"}]
        if entropy:
            groups.append(
                {
                    "params": entropy,
                    "lr": base_lr * self.hparams.entropy_lr_scale,
                    "name": "entropy",
                }
            )
        optimizers = [self.optimizer_factory(groups)]
        aux = list(self.codec.aux_parameters())
        if aux and self.aux_optimizer_factory is not None:
            optimizers.append(self.aux_optimizer_factory(aux))
        if self.scheduler_factory is None:
            return optimizers
        scheduler = {
            "scheduler": self.scheduler_factory(optimizers[0]),
            "interval": self.hparams.scheduler_interval,
            "monitor": self.hparams.scheduler_monitor,
        }
        return optimizers, [scheduler]

    # State-dict prefixes a warm start (`ckpt=`) may lack: parts this recipe adds to an earlier
    # stage's model, which keep their initialisation (HiFIC's discriminator).
    starts_fresh: tuple[str, ...] = ()

    def init_weights_from(self, path: str | Path) -> None:
        """`ckpt=`: initialise the weights from a checkpoint (the optimiser and step start
        afresh). Recipes that warm-start from another kind of checkpoint override this."""
        load_weights(self, path)

    def main_parameters(self) -> list[torch.nn.Parameter]:
        """Parameters the main optimiser may train (all of them here; a recipe with a part of
        its own optimiser, such as HiFIC's discriminator, leaves that part out)."""
        return list(self.parameters())

    def trained_codec(self) -> Codec:
        """The codec the optimiser trains (a recipe with EMA weights trains another copy)."""
        return self.codec

    def after_main_step(self) -> None:
        """Called after every step of the main optimiser (an EMA update, for instance)."""

    def setup(self, stage: str) -> None:
        # Parameters that only the auxiliary loss trains never see the distributed backward;
        # keep DDP from waiting for their gradients (they get identical updates on every rank).
        names = {id(p): n for n, p in self.named_parameters()}
        ignored = [names[id(p)] for p in self.codec.aux_parameters()]
        self._ddp_params_and_buffers_to_ignore = ignored

    def training_step(self, batch: Tensor, batch_idx: int) -> Tensor:
        optimizers = self.optimizers()
        optimizers = optimizers if isinstance(optimizers, list) else [optimizers]
        main_opt = optimizers[0]

        inputs, batch = self.training_pair(batch)
        out = self.trained_codec()(inputs)
        terms = self.rd_loss(batch, out)
        main_opt.zero_grad()
        self.manual_backward(terms.loss)
        if self.hparams.clip_max_norm > 0:
            self.clip_gradients(main_opt, self.hparams.clip_max_norm, "norm")
        main_opt.step()
        self.after_main_step()

        aux_loss = None
        if len(optimizers) > 1:
            aux_opt = optimizers[1].optimizer
            aux_opt.zero_grad()
            aux_loss = self.codec.aux_loss()
            aux_loss.backward()
            aux_opt.step()

        if self.scheduler_factory is not None and self.hparams.scheduler_interval == "step":
            self.lr_schedulers().step()
        # Logging costs a few percent of a small CPU step: do it only on the steps a logger keeps.
        if (
            self.global_step % self.trainer.log_every_n_steps == 0
        ):  # global_step already counts this one
            log = {"train/loss": terms.loss, "train/bpp": terms.bpp, "train/mse": terms.mse}
            if aux_loss is not None:
                log["train/aux_loss"] = aux_loss.detach()
            log["train/lr"] = torch.tensor(main_opt.optimizer.param_groups[0]["lr"])
            # Averaged over DDP ranks (every rank logs on the same steps, so the reduction pairs up).
            self.log_dict(log, on_step=True, on_epoch=False, sync_dist=True)
            self.log("bpp", terms.bpp, prog_bar=True, on_step=True, logger=False)
        return terms.loss.detach()

    def training_pair(self, batch: Tensor) -> tuple[Tensor, Tensor]:
        """(what the codec sees, what the loss compares with) of a training batch: the batch
        both times here; a recipe that augments or corrupts its inputs overrides this."""
        return batch, batch

    def on_train_epoch_end(self) -> None:
        if self.scheduler_factory is None or self.hparams.scheduler_interval != "epoch":
            return
        schedulers = self.lr_schedulers()
        for scheduler in schedulers if isinstance(schedulers, list) else [schedulers]:
            if isinstance(scheduler, torch.optim.lr_scheduler.ReduceLROnPlateau):
                value = self.trainer.callback_metrics.get(self.hparams.scheduler_monitor)
                if value is not None:
                    scheduler.step(value)
            else:
                scheduler.step()

    # ---- validation ---------------------------------------------------------------------------
    def validation_step(self, batch: Tensor, batch_idx: int) -> None:
        _, x_hat = self.validate_batch(batch)
        if batch_idx == 0 and self.hparams.num_logged_images > 0:
            k = self.hparams.num_logged_images
            log_reconstructions(self.loggers, batch[:k], x_hat[:k], self.global_step)

    def validate_batch(
        self,
        batch: Tensor,
        codec: Codec | None = None,
        metrics: torch.nn.ModuleDict | None = None,
    ) -> tuple[CodecOutput, Tensor]:
        """Add one batch to the validation metrics; returns the codec's output and the 8-bit
        reconstruction.

        Recipes that validate a batch several times (QVRF at every rate, QRes-VAE's plain and
        EMA weights) call it once per pass, with another `codec` and `metrics` where they need.
        """
        metrics = self.val_metrics if metrics is None else metrics
        out = self.validation_forward(batch) if codec is None else codec(batch)
        terms = self.rd_loss(batch, out)
        x_hat = quantize_8bit(out.x_hat)
        n = batch.shape[0]
        pixels = batch.shape[-2] * batch.shape[-1]
        metrics["loss"].update(terms.loss, weight=n)
        metrics["mse"].update(terms.mse, weight=n)
        metrics["bpp"].update(out.total_bits() / pixels)
        metrics["psnr"].update(psnr(batch, x_hat))
        scores = ms_ssim(batch, x_hat)
        if not torch.isnan(scores).any():
            metrics["ms_ssim"].update(scores)
        return out, x_hat

    def validation_forward(self, batch: Tensor) -> CodecOutput:
        """The pass validation measures (the codec in eval mode here)."""
        return self.codec(batch)

    def on_validation_epoch_end(self) -> None:
        for name, metric in self.val_metrics.items():
            if metric.update_count > 0:
                # compute() already averages over DDP ranks; sync_dist (a no-op on equal values)
                # only keeps Lightning from warning that epoch-level values are not synchronised.
                self.log(
                    f"val/{name}", metric.compute(), prog_bar=name in ("psnr",), sync_dist=True
                )
            metric.reset()

    # ---- checkpoints --------------------------------------------------------------------------
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Every checkpoint holds a coding-ready codec, and says which codec it is."""
        store_codec(checkpoint, self.codec)
