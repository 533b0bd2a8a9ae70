"""HiFIC's training recipe: a rate-distortion stage A, then a conditional-GAN stage B.

Generator loss (E, G and the hyperprior):  λ'·bpp + k_M·MSE₂₅₅ + k_P·LPIPS [+ β·L_G],
with λ' from the target-rate penalty (`src/losses/target_rate.py`), MSE₂₅₅ the mean squared
error on the 0–255 scale and LPIPS on AlexNet. Stage A (`adversarial=False`, `model=hific_base`)
has no discriminator at all; stage B (`model=hific`, `ckpt=<stage A>`) adds the latent-conditioned
discriminator, which starts fresh while everything else is loaded. `discriminator=tf` is the TF
reference's 70-px PatchGAN, `port` the PyTorch port's layout (`src/losses/adversarial.py`).

Stage B's checkpoint is its newest state: no validation figure ranks GAN checkpoints (val/loss
leaves the GAN term out and jumps with the rate switch), and both references evaluate the final
step. So in stage B `best.ckpt` is written without a monitor (`configure_callbacks`).

Three optimisers, stepped by hand: the transforms (with the factorized density at its own
learning-rate group), the auxiliary one for the entropy bottleneck's quantiles, and the
discriminator's. As in the PyTorch port, G and D take turns on successive batches:
`d_steps_per_g_step` batches update D, the next one updates E/G/hyperprior. `trainer.global_step`
counts generator steps only, so `trainer.max_steps` and the schedules mean generator steps.
"""

from __future__ import annotations

import logging
from typing import Any

import pytorch_lightning as pl
import torch
from pytorch_lightning.strategies import DDPStrategy
from torch import Tensor, nn
from torchmetrics import MeanMetric

from src.codecs.hific import HificCodec
from src.errors import ConfigError
from src.evaluation.metrics import ms_ssim, psnr, quantize_8bit
from src.lightning_modules.rate_distortion import OptimizerFactory, RateDistortion, SchedulerFactory
from src.losses.adversarial import (
    ConditionalDiscriminator,
    check_gan_loss,
    discriminator_loss,
    generator_loss,
)
from src.losses.perceptual import LPIPS
from src.losses.target_rate import TargetRate
from src.utils.image_logging import log_reconstructions

log = logging.getLogger(__name__)

K_MSE = 0.075 * 2**-5  # k_M, on the 0-255 scale
DISCRIMINATOR = "discriminator"


def count_parameters(modules: list[nn.Module]) -> int:
    """Number of parameters (trainable or not) of some modules."""
    return sum(p.numel() for m in modules for p in m.parameters())


class Hific(RateDistortion):
    """Train a `HificCodec` with HiFIC's loss, with or without its discriminator.

    Args:
        codec: a `HificCodec`.
        optimizer: partial of the optimiser of E, G and the hyperprior (Adam 1e-4).
        lmbda: λ_a, the rate weight above the target rate (the regime sets it).
        target_rate: r_t in bpp (the regime sets it).
        lmbda_under: λ_b, below the target; None takes the `rate_penalty` semantics' value.
        rate_penalty: "official" (TF HiFiC) or "port" (PyTorch port) penalty semantics.
        rate_warmup_steps: steps with the relaxed target and rescaled rate weights.
        rate_warmup_target_factor, rate_warmup_weight_factor: that warm-up's factors.
        regime: the regime's name (low | med | high), recorded with the run.
        k_mse: weight of the 0–255 MSE (k_M); k_lpips: weight of LPIPS (k_P).
        lpips_weights: directory with the LPIPS files, or "random" (tests only).
        lpips_net: "alex" (paper) or "vgg".
        adversarial: stage B (with the discriminator) or stage A (without).
        gan_weight: β; gan_loss: "non_saturating", "least_squares" (the references': on sigmoid
            outputs, halved) or "least_squares_logits".
        discriminator: the discriminator's layout, "tf" (TF reference) or "port".
        d_steps_per_g_step: discriminator batches per generator batch.
        disc_optimizer: partial of the discriminator's optimiser (defaults to `optimizer`).
        disc_channels, disc_latent_embedding: the discriminator's widths.
        metric: a label for the run name; HiFIC's distortion is always k_M·MSE + k_P·LPIPS.
        n_residual_blocks: the generator's block count, recorded with the run; it must match
            the codec's (the preset passes the same value to both).
        Others: as `RateDistortion`.
    """

    starts_fresh = (DISCRIMINATOR + ".",)

    def __init__(
        self,
        codec: HificCodec,
        optimizer: OptimizerFactory,
        lmbda: float,
        target_rate: float,
        lpips_weights: str | None = None,
        lmbda_under: float | None = None,
        rate_penalty: str = "official",
        rate_warmup_steps: int = 50_000,
        rate_warmup_target_factor: float = 0.20 / 0.14,
        rate_warmup_weight_factor: float = 2.0,
        regime: str | None = None,
        k_mse: float = K_MSE,
        k_lpips: float = 1.0,
        lpips_net: str = "alex",
        adversarial: bool = True,
        gan_weight: float = 0.15,
        gan_loss: str = "non_saturating",
        d_steps_per_g_step: int = 1,
        disc_optimizer: OptimizerFactory | None = None,
        disc_channels: tuple[int, ...] = (64, 128, 256, 512),
        disc_latent_embedding: int = 12,
        discriminator: str = "tf",
        metric: str = "mse-lpips",
        n_residual_blocks: int | None = None,
        quality: int | None = None,
        aux_optimizer: OptimizerFactory | None = None,
        scheduler: SchedulerFactory | None = None,
        scheduler_interval: str = "step",
        scheduler_monitor: str = "val/loss",
        entropy_lr_scale: float = 1.0,
        clip_max_norm: float = 0.0,
        num_logged_images: int = 2,
    ) -> None:
        if not isinstance(codec, HificCodec):
            raise ConfigError(f"the HiFIC recipe trains a HificCodec, got {type(codec).__name__}")
        if n_residual_blocks is not None and n_residual_blocks != codec.n_residual_blocks:
            raise ConfigError(
                f"model.n_residual_blocks={n_residual_blocks} but the codec has "
                f"{codec.n_residual_blocks}: set model.n_residual_blocks only"
            )
        disc_channels = tuple(int(c) for c in disc_channels)  # a plain tuple in the checkpoint
        if d_steps_per_g_step < 1:
            raise ConfigError(f"model.d_steps_per_g_step must be ≥ 1, got {d_steps_per_g_step}")
        super().__init__(
            codec,
            lmbda=lmbda,
            optimizer=optimizer,
            metric="mse",
            quality=quality,
            aux_optimizer=aux_optimizer,
            scheduler=scheduler,
            scheduler_interval=scheduler_interval,
            scheduler_monitor=scheduler_monitor,
            entropy_lr_scale=entropy_lr_scale,
            clip_max_norm=clip_max_norm,
            num_logged_images=num_logged_images,
        )
        # Plain values only in the checkpoint (the base class saw this frame's factories too).
        self.save_hyperparameters(
            ignore=["codec", "optimizer", "aux_optimizer", "scheduler", "disc_optimizer"],
            logger=False,
        )
        self.rate_target = TargetRate(
            target=target_rate,
            weight_over=lmbda,
            weight_under=lmbda_under,
            semantics=rate_penalty,
            warmup_steps=rate_warmup_steps,
            warmup_target_factor=rate_warmup_target_factor,
            warmup_weight_factor=rate_warmup_weight_factor,
        )
        self.gan_loss = check_gan_loss(gan_loss)
        self.disc_optimizer_factory = disc_optimizer or optimizer
        self.discriminator = (
            ConditionalDiscriminator(
                codec.latent_channels, disc_channels, disc_latent_embedding, layout=discriminator
            )
            if adversarial
            else None
        )
        # LPIPS is frozen and built from files at setup: kept out of the state dict (a stage A run
        # with one set of LPIPS weights never overwrites another's) and out of the optimisers.
        self._lpips: list[LPIPS] = []
        self._reference: tuple[Tensor, Tensor] | None = None
        self.val_metrics["lpips"] = MeanMetric()

    # ---- parts ---------------------------------------------------------------------------------
    def parameter_counts(self) -> dict[str, int]:
        """Parameters of each part: encoder, generator, hyperprior and discriminator."""
        counts = {name: count_parameters(mods) for name, mods in self.codec.parts().items()}
        counts[DISCRIMINATOR] = count_parameters([self.discriminator]) if self.discriminator else 0
        return counts

    @property
    def lpips(self) -> LPIPS:
        """The perceptual network, on this module's device."""
        if not self._lpips:
            self._lpips.append(
                LPIPS(self.hparams.lpips_weights, self.hparams.lpips_net, key="model.lpips_weights")
            )
        net = self._lpips[0]
        if next(net.parameters()).device != self.device:
            net.to(self.device)
        return net

    def main_parameters(self) -> list[nn.Parameter]:
        return list(self.codec.parameters())

    def setup(self, stage: str) -> None:
        if self.hparams.regime is None:
            raise ConfigError(
                "HiFIC trains towards a target rate: add regime=low, regime=med or regime=high "
                "(0.14 / 0.30 / 0.45 bpp, conf/regime/)"
            )
        super().setup(stage)
        _ = self.lpips  # fail before the first batch when the LPIPS files are missing
        counts = self.parameter_counts()
        lines = ", ".join(f"{name} {n / 1e6:.2f} M" for name, n in counts.items())
        log.info("HiFIC parameters: %s (total %.2f M)", lines, sum(counts.values()) / 1e6)
        strategy = self.trainer.strategy if self._trainer is not None else None
        if self.discriminator is not None and isinstance(strategy, DDPStrategy):
            # G batches leave D's parameters unused and D batches the codec's: DDP must expect it
            # (setup runs before the strategy wraps the module).
            strategy._ddp_kwargs["find_unused_parameters"] = True

    def configure_callbacks(self) -> list[pl.Callback]:
        """Stage B: the configured `ModelCheckpoint`, unmonitored, so `best.ckpt` is the newest
        state (see the module docstring). Lightning puts it in place of the configured one."""
        current = self._trainer.checkpoint_callback if self._trainer is not None else None
        if self.discriminator is None or current is None or current.monitor is None:
            return []
        return [  # of the configured class (NewestLastCheckpoint): Lightning replaces by type
            type(current)(
                dirpath=current.dirpath,
                filename=current.filename,
                save_last=current.save_last,
                auto_insert_metric_name=current.auto_insert_metric_name,
                every_n_train_steps=current._every_n_train_steps,
                every_n_epochs=current._every_n_epochs,
            )
        ]

    def configure_optimizers(self) -> Any:
        configured = super().configure_optimizers()
        optimizers, schedulers = configured if isinstance(configured, tuple) else (configured, [])
        if self.aux_optimizer_factory is None:
            raise ConfigError("HiFIC needs model.aux_optimizer for the entropy bottleneck")
        if self.discriminator is None:
            return configured
        disc = self.disc_optimizer_factory(list(self.discriminator.parameters()))
        optimizers = [*optimizers, disc]
        if self.scheduler_factory is None:
            return optimizers
        schedulers = [
            *schedulers,
            {**schedulers[0], "scheduler": self.scheduler_factory(disc)},
        ]
        return optimizers, schedulers

    # ---- losses --------------------------------------------------------------------------------
    def generator_terms(self, x: Tensor) -> dict[str, Tensor]:
        """The generator's loss and its parts for a batch (GAN term only in stage B)."""
        out = self.codec(x)
        num_pixels = x.shape[0] * x.shape[-2] * x.shape[-1]
        bpp = out.total_bits().sum() / num_pixels
        quantized_bpp = out.extras["quantized_bits"].sum() / num_pixels
        step = self.global_step
        rate_weight = self.rate_target.weight(float(quantized_bpp), step)
        mse = (x - out.x_hat).pow(2).mean()
        lpips = self.lpips(x, out.x_hat).mean()
        loss = rate_weight * bpp + self.hparams.k_mse * 255**2 * mse + self.hparams.k_lpips * lpips
        terms = {
            "bpp": bpp,
            "quantized_bpp": quantized_bpp,
            "rate_weight": torch.tensor(rate_weight),
            "target_rate": torch.tensor(self.rate_target.target_at(step)),
            "mse": mse,
            "lpips": lpips,
            "x_hat": out.x_hat,
        }
        if self.discriminator is not None and self.training:
            terms["gan"] = generator_loss(
                self.discriminator(out.x_hat, out.extras["y_hat"]), self.gan_loss
            )
            loss = loss + self.hparams.gan_weight * terms["gan"]
        terms["loss"] = loss
        return terms

    def discriminator_terms(self, x: Tensor) -> dict[str, Tensor]:
        """D's loss on real images against the current generator's, both conditioned on ŷ."""
        with torch.no_grad():
            out = self.codec(x)
        y_hat = out.extras["y_hat"]
        logits = self.discriminator(torch.cat([x, out.x_hat]), torch.cat([y_hat, y_hat]))
        real, fake = logits.chunk(2)
        return {
            "loss": discriminator_loss(real, fake, self.gan_loss),
            "real": torch.sigmoid(real).mean(),
            "fake": torch.sigmoid(fake).mean(),
        }

    # ---- training ------------------------------------------------------------------------------
    def discriminator_turn(self) -> bool:
        """Whether this batch trains D: D takes `d_steps_per_g_step` batches per G batch."""
        if self.discriminator is None:
            return False
        taken = int(self.discriminator.steps_taken)
        return taken < self.hparams.d_steps_per_g_step * (self.global_step + 1)

    def training_step(self, batch: Tensor, batch_idx: int) -> Tensor:
        optimizers = self.optimizers()
        optimizers = optimizers if isinstance(optimizers, list) else [optimizers]
        logging_step = self.global_step % self.trainer.log_every_n_steps == 0
        if self.discriminator_turn():
            # The raw optimiser: a D step must not advance trainer.global_step (G steps only).
            disc_opt = optimizers[-1].optimizer
            terms = self.discriminator_terms(batch)
            disc_opt.zero_grad()
            self.manual_backward(terms["loss"])
            disc_opt.step()
            self.discriminator.steps_taken += 1
            if logging_step:
                self.log_dict(
                    {f"train/d_{k}": v.detach() for k, v in terms.items()},
                    on_step=True,
                    on_epoch=False,
                )
            return terms["loss"].detach()

        main_opt, aux_opt = optimizers[0], optimizers[1].optimizer
        if self.discriminator is not None:
            self.discriminator.requires_grad_(False)
        terms = self.generator_terms(batch)
        main_opt.zero_grad()
        self.manual_backward(terms["loss"])
        if self.hparams.clip_max_norm > 0:
            self.clip_gradients(main_opt, self.hparams.clip_max_norm, "norm")
        main_opt.step()
        if self.discriminator is not None:
            self.discriminator.requires_grad_(True)

        aux_opt.zero_grad()
        aux_loss = self.codec.aux_loss()
        aux_loss.backward()
        aux_opt.step()

        if self.scheduler_factory is not None and self.hparams.scheduler_interval == "step":
            schedulers = self.lr_schedulers()
            for scheduler in schedulers if isinstance(schedulers, list) else [schedulers]:
                scheduler.step()
        if self.global_step % self.trainer.log_every_n_steps == 0:
            logged = {f"train/{k}": v.detach() for k, v in terms.items() if k != "x_hat"}
            logged["train/aux_loss"] = aux_loss.detach()
            logged["train/lr"] = torch.tensor(main_opt.optimizer.param_groups[0]["lr"])
            self.log_dict(logged, on_step=True, on_epoch=False)
            self.log("bpp", terms["bpp"], prog_bar=True, on_step=True, logger=False)
        return terms["loss"].detach()

    # ---- validation ----------------------------------------------------------------------------
    def on_fit_start(self) -> None:
        """Keep a few validation crops and their reconstructions at the start of this run.

        Stage B starts from stage A's weights, so these are stage A's reconstructions; each
        validation then logs original | stage A | now, side by side (a few images, on the CPU).
        """
        k = self.hparams.num_logged_images
        datamodule = getattr(self.trainer, "datamodule", None)
        if self.discriminator is None or k <= 0 or datamodule is None:
            return
        batch = next(iter(datamodule.val_dataloader()), None)
        if batch is None:
            return
        x = batch[:k].to(self.device)
        was_training = self.codec.training
        self.codec.eval()
        with torch.no_grad():
            x_hat = quantize_8bit(self.codec(x).x_hat)
        self.codec.train(was_training)
        self._reference = (x.cpu(), x_hat.cpu())

    def validation_step(self, batch: Tensor, batch_idx: int) -> None:
        terms = self.generator_terms(batch)
        x_hat = quantize_8bit(terms["x_hat"])
        n = batch.shape[0]
        metrics = self.val_metrics
        metrics["loss"].update(terms["loss"], weight=n)
        metrics["mse"].update(terms["mse"], weight=n)
        metrics["lpips"].update(terms["lpips"], weight=n)
        metrics["bpp"].update(terms["bpp"], weight=n)
        metrics["psnr"].update(psnr(batch, x_hat))
        scores = ms_ssim(batch, x_hat)
        if not torch.isnan(scores).any():
            metrics["ms_ssim"].update(scores)
        if batch_idx == 0 and self.hparams.num_logged_images > 0:
            k = self.hparams.num_logged_images
            if self._reference is not None:
                x, x_start = (t.to(self.device) for t in self._reference)
                x_now = quantize_8bit(self.codec(x).x_hat)
                log_reconstructions(
                    self.loggers, x, torch.cat([x_start, x_now], dim=-1), self.global_step
                )
            else:
                log_reconstructions(self.loggers, batch[:k], x_hat[:k], self.global_step)
