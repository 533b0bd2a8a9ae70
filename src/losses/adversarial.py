"""HiFIC's conditional patch discriminator and the GAN losses (training-only parts).

The discriminator sees an image together with the quantised latent ŷ it was decoded from: ŷ
(detached) goes through a 3×3 conv to 12 channels and LeakyReLU, is upsampled ×16 (nearest) to
the image size and concatenated with it; four 4×4 stride-2 convs (64, 128, 256, 512) with
LeakyReLU(0.2) and a 1×1 conv give one logit per 16×16 patch. Every conv is spectral-normed.
This is the PyTorch port's layout (the TF reference ends with two stride-1 4×4 convs instead).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.utils.parametrizations import spectral_norm

from src.errors import ConfigError

GAN_LOSSES = ("non_saturating", "least_squares")


class ConditionalDiscriminator(nn.Module):
    """Patch logits D(x, ŷ), shape (B, 1, H/16, W/16) for four stride-2 layers.

    Args:
        latent_channels: channels of ŷ (the codec's M).
        channels: widths of the stride-2 convs (paper 64, 128, 256, 512).
        latent_embedding: channels ŷ is projected to before upsampling (paper 12).
    """

    def __init__(
        self,
        latent_channels: int,
        channels: Sequence[int] = (64, 128, 256, 512),
        latent_embedding: int = 12,
    ) -> None:
        super().__init__()
        self.embed = spectral_norm(
            nn.Conv2d(latent_channels, latent_embedding, 3, padding=1, padding_mode="reflect")
        )
        layers: list[nn.Module] = []
        width = 3 + latent_embedding
        for c in channels:
            layers += [
                spectral_norm(nn.Conv2d(width, c, 4, stride=2, padding=1)),
                nn.LeakyReLU(0.2),
            ]
            width = c
        layers.append(spectral_norm(nn.Conv2d(width, 1, 1)))
        self.net = nn.Sequential(*layers)
        # D steps taken so far: persists in checkpoints, so G/D alternation survives a resume.
        self.register_buffer("steps_taken", torch.zeros((), dtype=torch.long))

    def forward(self, x: Tensor, y_hat: Tensor) -> Tensor:
        """Logits for images `x` in [0, 1] decoded from `y_hat` (the latent is detached)."""
        cond = F.leaky_relu(self.embed(y_hat.detach()), 0.2)
        factor = -(-x.shape[-1] // y_hat.shape[-1])  # the codec's latent stride (padded input)
        cond = F.interpolate(cond, scale_factor=factor, mode="nearest")
        cond = cond[..., : x.shape[-2], : x.shape[-1]]
        return self.net(torch.cat([x * 2 - 1, cond], dim=1))


def check_gan_loss(kind: str) -> str:
    """`kind` itself, or a ConfigError naming the choices."""
    if kind not in GAN_LOSSES:
        raise ConfigError(f"model.gan_loss must be one of {GAN_LOSSES}, got {kind!r}")
    return kind


def discriminator_loss(real_logits: Tensor, fake_logits: Tensor, kind: str) -> Tensor:
    """D's loss: real patches towards 1, generated ones towards 0."""
    if kind == "least_squares":
        return (real_logits - 1).pow(2).mean() + fake_logits.pow(2).mean()
    return F.binary_cross_entropy_with_logits(
        real_logits, torch.ones_like(real_logits)
    ) + F.binary_cross_entropy_with_logits(fake_logits, torch.zeros_like(fake_logits))


def generator_loss(fake_logits: Tensor, kind: str) -> Tensor:
    """G's adversarial loss: non-saturating −log D(x̂), or (D(x̂) − 1)² for least squares."""
    if kind == "least_squares":
        return (fake_logits - 1).pow(2).mean()
    return F.binary_cross_entropy_with_logits(fake_logits, torch.ones_like(fake_logits))
