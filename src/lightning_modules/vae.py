"""Training recipe for VAE codecs whose rate is a KL (iREC): bits/pixel + β·D with free bits.

The lossy iREC loss is β·255²·MSE + KL bits per pixel, so β is exactly CompressAI's λ; the
lossless model's bits already hold the pixel NLL and its reconstruction is exact, so its loss is
the code length alone. Free bits (Kingma et al. 2016) stop each latent channel's batch-mean KL
from being pushed below `free_bits` nats, which keeps deep hierarchies from collapsing; they
apply in training only (the codec hands out per-channel KLs in train mode).

Validation measures what relative entropy coding produces, a posterior sample, as the paper
reports it: `val/loss`, `val/bpp` (for the lossless model the sampled ELBO; also
`val/bits_per_dim`) and `val/psnr` (the sampled reconstruction) come from
`codec.forward_sampled`, so best.ckpt is chosen on them; the posterior mean's figures follow as
`val/loss_mean`, `val/bpp_mean`, `val/psnr_mean`. With `ema_decay` > 0 the optimiser trains
`online` and `codec` holds the EMA of its weights, which is validated, saved and coded with.
"""

from __future__ import annotations

import copy
import math
from typing import Any

import torch
from pytorch_msssim import ms_ssim
from torch import Tensor
from torchmetrics import MeanMetric

from src.codecs.base import Codec, CodecOutput
from src.errors import ConfigError
from src.evaluation.metrics import psnr, quantize_8bit
from src.lightning_modules.ema import ema_update
from src.lightning_modules.rate_distortion import OptimizerFactory, RateDistortion
from src.losses.rate_distortion import RateDistortionLoss, RDTerms

LN2 = math.log(2)


MS_SSIM_CONVENTIONS = ("reference", "compressai")


class ElboLoss:
    """bits/pixel + β·D, where the latent bits below `free_bits` nats per channel are free.

    For metric "ms-ssim", `ms_ssim_convention` "reference" takes the iREC code's
    D = 255 · (1 - MS-SSIM) with all five scale weights 1 (its β ladder 0.003 ... 0.08);
    "compressai" the framework's D = 1 - MS-SSIM with the standard weights.
    """

    def __init__(
        self,
        beta: float,
        metric: str = "mse",
        free_bits: float = 0.0,
        ms_ssim_convention: str = "reference",
    ) -> None:
        if beta < 0:
            raise ConfigError(f"model.beta must be non-negative, got {beta}")
        if free_bits < 0:
            raise ConfigError(f"model.free_bits must be non-negative, got {free_bits}")
        if ms_ssim_convention not in MS_SSIM_CONVENTIONS:
            raise ConfigError(
                f"model.ms_ssim_convention must be one of {MS_SSIM_CONVENTIONS}, "
                f"got {ms_ssim_convention!r}"
            )
        self.beta, self.free_bits = float(beta), float(free_bits)
        self.reference_ms_ssim = metric == "ms-ssim" and ms_ssim_convention == "reference"
        self.distortion = RateDistortionLoss(1.0, metric)

    def __call__(self, x: Tensor, out: CodecOutput) -> RDTerms:
        terms = self.distortion(x, out)  # bpp + 1·D: read its parts
        if self.reference_ms_ssim:
            score = ms_ssim(x, out.x_hat, data_range=1.0, weights=[1.0] * 5)
            terms = RDTerms(terms.loss, terms.bpp, 255 * (1 - score), terms.mse)
        rate = terms.bpp
        per_channel = out.extras.get("kl_nats_per_channel")
        if self.free_bits > 0 and per_channel:
            num_pixels = x.shape[0] * x.shape[-2] * x.shape[-1]
            kl_bits = sum(k.sum() for k in per_channel) / LN2
            free = sum(k.mean(0).clamp_min(self.free_bits).sum() for k in per_channel)
            rate = rate + (x.shape[0] * free / LN2 - kl_bits) / num_pixels
        loss = rate + self.beta * terms.distortion if self.beta > 0 else rate
        return RDTerms(loss=loss, bpp=terms.bpp, distortion=terms.distortion, mse=terms.mse)


class VaeRateDistortion(RateDistortion):
    """`RateDistortion` with iREC's loss: β (the name users type) and free bits.

    Args:
        codec: the VAE codec.
        beta: weight of 255²·MSE (CompressAI's λ); 0 for a lossless codec.
        optimizer: partial of a torch optimiser.
        free_bits: nats per latent channel per group kept free of charge (0 disables).
        lmbda: an alias of beta kept for run names; it must equal beta when given.
        ms_ssim_convention: "reference" or "compressai" (see `ElboLoss`).
        ema_decay: decay of the EMA weights that validation, checkpoints and coding use
            (the reference's 0.999); 0 trains and codes with the same weights.
        **kwargs: the rest of `RateDistortion`'s arguments (metric, scheduler, clipping, ...).
    """

    def __init__(
        self,
        codec: Codec,
        beta: float,
        optimizer: OptimizerFactory,
        free_bits: float = 0.0,
        lmbda: float | None = None,
        metric: str = "mse",
        ms_ssim_convention: str = "reference",
        ema_decay: float = 0.0,
        **kwargs: Any,
    ) -> None:
        if lmbda is not None and float(lmbda) != float(beta):
            raise ConfigError(
                f"model.lmbda ({lmbda}) is iREC's β: set model.beta instead (got beta={beta})"
            )
        # The base class needs a positive λ for its own loss, which is replaced right after.
        if not 0 <= ema_decay < 1:
            raise ConfigError(f"model.ema_decay must be in [0, 1), got {ema_decay}")
        super().__init__(
            codec=codec, lmbda=beta or 1.0, optimizer=optimizer, metric=metric, **kwargs
        )
        self.hparams.update(ema_decay=ema_decay, ms_ssim_convention=ms_ssim_convention)
        self.rd_loss = ElboLoss(beta, metric, free_bits, ms_ssim_convention)
        self.lossless = bool(getattr(codec, "lossless", False))
        names = ["loss_mean", "bpp_mean"] + (["bits_per_dim"] if self.lossless else ["psnr_mean"])
        self.val_metrics.update({name: MeanMetric() for name in names})
        if ema_decay > 0:
            # `online` is trained; `codec` (the EMA) is validated, checkpointed and coded with.
            self.online = self.codec
            self.codec = copy.deepcopy(codec).requires_grad_(False)

    # ---- EMA -----------------------------------------------------------------------------------
    def trained_codec(self) -> Codec:
        return self.online if self.hparams.ema_decay > 0 else self.codec

    def main_parameters(self) -> list[torch.nn.Parameter]:
        return list(self.trained_codec().parameters())

    def after_main_step(self) -> None:
        if self.hparams.ema_decay > 0:
            ema_update(self.codec, self.online, self.hparams.ema_decay)

    # ---- validation: the coded (sampled) figures, then the posterior mean's -----------------
    def validation_forward(self, batch: Tensor) -> CodecOutput:
        return self.codec.forward_sampled(batch)

    def validate_batch(self, batch: Tensor) -> tuple[CodecOutput, Tensor]:
        out, x_hat = super().validate_batch(batch)
        mean = self.codec(batch)
        pixels = batch.shape[-2] * batch.shape[-1]
        self.val_metrics["loss_mean"].update(self.rd_loss(batch, mean).loss, weight=batch.shape[0])
        self.val_metrics["bpp_mean"].update(mean.total_bits() / pixels)
        if self.lossless:
            self.val_metrics["bits_per_dim"].update(out.total_bits() / (3 * pixels))
        else:
            self.val_metrics["psnr_mean"].update(psnr(batch, quantize_8bit(mean.x_hat)))
        return out, x_hat
