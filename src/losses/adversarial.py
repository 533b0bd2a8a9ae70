"""HiFIC's conditional patch discriminators and the GAN losses (training-only parts).

A discriminator sees an image together with the quantised latent ŷ it was decoded from: ŷ
(detached) goes through a 3×3 conv to 12 channels and LeakyReLU(0.2), is upsampled (nearest) to
the image size and concatenated with it. Two layouts, `layout=`:
- "tf" (the TF reference, compare_gan's PatchGAN; the paper presets' default): 4×4 convs, three
  at stride 2 (64, 128, 256) and one at stride 1 (512), each with LeakyReLU(0.2), then a 4×4
  stride-1 conv to one channel: a 70-px receptive field, one logit per 8×8 block. Every conv is
  spectral-normed and zero-padded ("SAME"); images enter in [0, 1].
- "port" (the PyTorch port): four 4×4 stride-2 convs (64, 128, 256, 512) with reflection padding
  and spectral norm, then a plain 1×1 conv: a 46-px receptive field, one logit per 16×16 block.
  The latent's 3×3 conv is plain and reflection-padded; images enter in [-1, 1] (its `-norm`).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.utils.parametrizations import spectral_norm

from src.errors import ConfigError

GAN_LOSSES = ("non_saturating", "least_squares", "least_squares_logits")
LAYOUTS = ("tf", "port")


def _tf_layers(width: int, channels: Sequence[int]) -> list[nn.Module]:
    """compare_gan's PatchGAN: stride-2 convs for all widths but the last, which is stride 1."""
    layers: list[nn.Module] = []
    for i, c in enumerate(channels):
        if i < len(channels) - 1:
            layers.append(spectral_norm(nn.Conv2d(width, c, 4, stride=2, padding=1)))
        else:  # TF's "SAME" for an even kernel at stride 1 pads one before, two after
            layers += [nn.ZeroPad2d((1, 2, 1, 2)), spectral_norm(nn.Conv2d(width, c, 4))]
        layers.append(nn.LeakyReLU(0.2))
        width = c
    return [*layers, nn.ZeroPad2d((1, 2, 1, 2)), spectral_norm(nn.Conv2d(width, 1, 4))]


def _port_layers(width: int, channels: Sequence[int]) -> list[nn.Module]:
    """The port's: stride-2 reflection-padded convs for every width, then a plain 1×1 conv."""
    layers: list[nn.Module] = []
    for c in channels:
        conv = nn.Conv2d(width, c, 4, stride=2, padding=1, padding_mode="reflect")
        layers += [spectral_norm(conv), nn.LeakyReLU(0.2)]
        width = c
    return [*layers, nn.Conv2d(width, 1, 1)]


class ConditionalDiscriminator(nn.Module):
    """Patch logits D(x, ŷ): (B, 1, H/8, W/8) for layout "tf", (B, 1, H/16, W/16) for "port".

    Args:
        latent_channels: channels of ŷ (the codec's M).
        channels: widths of the 4×4 convs (paper 64, 128, 256, 512).
        latent_embedding: channels ŷ is projected to before upsampling (paper 12).
        layout: "tf" or "port" (see the module docstring).
    """

    def __init__(
        self,
        latent_channels: int,
        channels: Sequence[int] = (64, 128, 256, 512),
        latent_embedding: int = 12,
        layout: str = "tf",
    ) -> None:
        super().__init__()
        if layout not in LAYOUTS:
            raise ConfigError(f"model.discriminator must be one of {LAYOUTS}, got {layout!r}")
        self.layout = layout
        if layout == "tf":
            self.embed = spectral_norm(nn.Conv2d(latent_channels, latent_embedding, 3, padding=1))
            layers = _tf_layers(3 + latent_embedding, channels)
        else:
            self.embed = nn.Conv2d(
                latent_channels, latent_embedding, 3, padding=1, padding_mode="reflect"
            )
            layers = _port_layers(3 + latent_embedding, channels)
        self.net = nn.Sequential(*layers)
        # D steps taken so far: persists in checkpoints, so G/D alternation survives a resume.
        self.register_buffer("steps_taken", torch.zeros((), dtype=torch.long))

    def forward(self, x: Tensor, y_hat: Tensor) -> Tensor:
        """Logits for images `x` in [0, 1] decoded from `y_hat` (the latent is detached)."""
        cond = F.leaky_relu(self.embed(y_hat.detach()), 0.2)
        factor = -(-x.shape[-1] // y_hat.shape[-1])  # the codec's latent stride (padded input)
        cond = F.interpolate(cond, scale_factor=factor, mode="nearest")
        cond = cond[..., : x.shape[-2], : x.shape[-1]]
        image = x if self.layout == "tf" else x * 2 - 1
        return self.net(torch.cat([image, cond], dim=1))


def check_gan_loss(kind: str) -> str:
    """`kind` itself, or a ConfigError naming the choices."""
    if kind not in GAN_LOSSES:
        raise ConfigError(f"model.gan_loss must be one of {GAN_LOSSES}, got {kind!r}")
    return kind


def discriminator_loss(real_logits: Tensor, fake_logits: Tensor, kind: str) -> Tensor:
    """D's loss: real patches towards 1, generated ones towards 0.

    "least_squares" is both references' (compare_gan, the port): squared errors of D's sigmoid
    outputs, halved; "least_squares_logits" is Mao et al.'s on raw logits, not halved."""
    if kind == "least_squares":
        real, fake = torch.sigmoid(real_logits), torch.sigmoid(fake_logits)
        return 0.5 * ((real - 1).pow(2).mean() + fake.pow(2).mean())
    if kind == "least_squares_logits":
        return (real_logits - 1).pow(2).mean() + fake_logits.pow(2).mean()
    return F.binary_cross_entropy_with_logits(
        real_logits, torch.ones_like(real_logits)
    ) + F.binary_cross_entropy_with_logits(fake_logits, torch.zeros_like(fake_logits))


def generator_loss(fake_logits: Tensor, kind: str) -> Tensor:
    """G's adversarial loss: non-saturating −log D(x̂), or (D(x̂) − 1)² for least squares (on
    sigmoid outputs and halved for "least_squares", on logits for "least_squares_logits")."""
    if kind == "least_squares":
        return 0.5 * (torch.sigmoid(fake_logits) - 1).pow(2).mean()
    if kind == "least_squares_logits":
        return (fake_logits - 1).pow(2).mean()
    return F.binary_cross_entropy_with_logits(fake_logits, torch.ones_like(fake_logits))
