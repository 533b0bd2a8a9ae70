"""Training recipe for VAE codecs whose rate is a KL (iREC): bits/pixel + β·D with free bits.

The lossy iREC loss is β·255²·MSE + KL bits per pixel, so β is exactly CompressAI's λ; the
lossless model's bits already hold the pixel NLL and its reconstruction is exact, so its loss is
the code length alone. Free bits (Kingma et al. 2016) stop each latent channel's batch-mean KL
from being pushed below `free_bits` nats, which keeps deep hierarchies from collapsing.
"""

from __future__ import annotations

import math
from typing import Any

from torch import Tensor

from src.codecs.base import Codec, CodecOutput
from src.errors import ConfigError
from src.lightning_modules.rate_distortion import OptimizerFactory, RateDistortion
from src.losses.rate_distortion import RateDistortionLoss, RDTerms

LN2 = math.log(2)


class ElboLoss:
    """bits/pixel + β·D, where the latent bits below `free_bits` nats per channel are free."""

    def __init__(self, beta: float, metric: str = "mse", free_bits: float = 0.0) -> None:
        if beta < 0:
            raise ConfigError(f"model.beta must be non-negative, got {beta}")
        if free_bits < 0:
            raise ConfigError(f"model.free_bits must be non-negative, got {free_bits}")
        self.beta, self.free_bits = float(beta), float(free_bits)
        self.distortion = RateDistortionLoss(1.0, metric)

    def __call__(self, x: Tensor, out: CodecOutput) -> RDTerms:
        terms = self.distortion(x, out)  # bpp + 1·D: read its parts
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
        **kwargs: Any,
    ) -> None:
        if lmbda is not None and float(lmbda) != float(beta):
            raise ConfigError(
                f"model.lmbda ({lmbda}) is iREC's β: set model.beta instead (got beta={beta})"
            )
        # The base class needs a positive λ for its own loss, which is replaced right after.
        super().__init__(
            codec=codec, lmbda=beta or 1.0, optimizer=optimizer, metric=metric, **kwargs
        )
        self.rd_loss = ElboLoss(beta, metric, free_bits)
