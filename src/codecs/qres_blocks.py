"""Building blocks of QRes-VAE (Duan et al., WACV 2023): ConvNeXt blocks, VDVAE bottlenecks, and
the quantisation-aware latent block.

Conventions follow the reference implementation so parameter counts and initial behaviour match:
every convolution's bias starts at zero, ConvNeXt blocks use an MLP ratio of 2 and a layer scale
starting at 1e-6, the prior head's last convolution starts at zero (prior N(0, 1.1²) at start).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

# The prior's log-scale is bounded softly from below: softplus(l + 2.3) - 2.3 > -2.3.
PRIOR_LOGSCALE_FLOOR = 2.3
# Below this probability the bin mass is replaced by density x bin width (the reference's clamp).
PROB_CLAMP = 1e-6


def conv(in_ch: int, out_ch: int, kernel: int, stride: int = 1, zero_weights: bool = False):
    """A 2-D convolution with "same" padding for stride 1 and a zero bias."""
    padding = kernel // 2 if stride == 1 else 0
    layer = nn.Conv2d(in_ch, out_ch, kernel, stride, padding)
    nn.init.zeros_(layer.bias)
    if zero_weights:
        nn.init.zeros_(layer.weight)
    return layer


def patch_downsample(in_ch: int, out_ch: int, rate: int) -> nn.Conv2d:
    """Non-overlapping patches to channels: a convolution with kernel = stride = `rate`."""
    return conv(in_ch, out_ch, rate, stride=rate)


def patch_upsample(in_ch: int, out_ch: int, rate: int) -> nn.Sequential:
    """Channels to non-overlapping patches: a 1x1 convolution then pixel shuffle."""
    return nn.Sequential(conv(in_ch, out_ch * rate * rate, 1), nn.PixelShuffle(rate))


def deconv(in_ch: int, out_ch: int, kernel: int = 5) -> nn.ConvTranspose2d:
    """A stride-2 transposed convolution that exactly doubles the resolution."""
    return nn.ConvTranspose2d(in_ch, out_ch, kernel, 2, padding=kernel // 2, output_padding=1)


class ConvNeXtBlock(nn.Module):
    """Depthwise conv -> channels-last LayerNorm -> MLP (ratio 2, GELU) -> layer scale, residual."""

    def __init__(self, dim: int, kernel: int = 7, mlp_ratio: int = 2) -> None:
        super().__init__()
        self.conv_dw = nn.Conv2d(dim, dim, kernel, padding=kernel // 2, groups=dim)
        self.norm = nn.LayerNorm(dim, eps=1e-6)
        self.fc1 = nn.Linear(dim, mlp_ratio * dim)
        self.fc2 = nn.Linear(mlp_ratio * dim, dim)
        self.gamma = nn.Parameter(torch.full((dim,), 1e-6))

    def forward(self, x: Tensor) -> Tensor:
        y = self.conv_dw(x).permute(0, 2, 3, 1)
        y = self.fc2(F.gelu(self.fc1(self.norm(y))))
        return x + (y * self.gamma).permute(0, 3, 1, 2)


class ConvNeXtDown(nn.Module):
    """A ConvNeXt block (kernel 7) at the input width, then patch downsampling."""

    def __init__(self, in_ch: int, out_ch: int, rate: int = 2) -> None:
        super().__init__()
        self.block = ConvNeXtBlock(in_ch, 7)
        self.down = patch_downsample(in_ch, out_ch, rate)

    def forward(self, x: Tensor) -> Tensor:
        return self.down(self.block(x))


class Bottleneck(nn.Module):
    """VDVAE's bottleneck without residual: GELU before each of 1x1, kxk, kxk, 1x1 convolutions.

    The middle convolutions are 3x3, or 1x1 where the level's kernel size is below 3.
    """

    def __init__(
        self, in_ch: int, hidden: int, out_ch: int, use_3x3: bool, zero_last: bool = False
    ) -> None:
        super().__init__()
        k = 3 if use_3x3 else 1
        self.convs = nn.ModuleList(
            [
                conv(in_ch, hidden, 1),
                conv(hidden, hidden, k),
                conv(hidden, hidden, k),
                conv(hidden, out_ch, 1, zero_weights=zero_last),
            ]
        )

    def forward(self, x: Tensor) -> Tensor:
        for layer in self.convs:
            x = layer(F.gelu(x))
        return x


def discretized_gaussian_log_mass(x: Tensor, mean: Tensor, scale: Tensor) -> Tensor:
    """log P(x) of N(mean, scale²) integrated over the unit bin centred at `x`, in fp32.

    Where the mass underflows below 1e-6 the log density is used instead (the reference's
    fallback), which keeps gradients finite far in the tails.
    """
    with torch.autocast(device_type=x.device.type, enabled=False):
        x, mean, scale = x.float(), mean.float(), scale.float()
        normal = torch.distributions.Normal(mean, scale, validate_args=False)
        mass = normal.cdf(x + 0.5) - normal.cdf(x - 0.5)
        return torch.where(mass > PROB_CLAMP, torch.log(mass.clamp(min=1e-8)), normal.log_prob(x))


class LatentBlock(nn.Module):
    """One latent level of the top-down decoder (the paper's QLatentBlockX).

    The prior p(z | z_<i) = N(pm, σ²) * U(-½, ½) comes from the features so far; the posterior
    is a unit-width uniform around `qm`, predicted from those features and the encoder's feature
    at the same resolution. The sampled or decoded z is projected back into the features.
    """

    def __init__(self, width: int, zdim: int, kernel: int) -> None:
        super().__init__()
        hidden = width // 4
        use_3x3 = kernel >= 3
        self.front = ConvNeXtBlock(width, kernel)
        self.end = ConvNeXtBlock(width, kernel)
        self.posterior = Bottleneck(2 * width, hidden, zdim, use_3x3)
        self.prior_head = Bottleneck(width, hidden, 2 * zdim, use_3x3, zero_last=True)
        self.z_proj = nn.Sequential(
            conv(zdim, hidden // 2, 3 if use_3x3 else 1), nn.GELU(), conv(hidden // 2, width, 1)
        )

    def scale_residual(self, num_blocks: int) -> None:
        """The reference's initial scaling of the z projection: sqrt(1 / 3*N) in Python, which
        evaluates to sqrt(N / 3) (= 2 for 12 blocks). Reproduced as trained, not "fixed"."""
        self.z_proj[2].weight.data.mul_(math.sqrt(1 / 3 * num_blocks))

    def prior(self, feature: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """The block's front features, and the prior mean and scale of its latent."""
        feature = self.front(feature)
        pm, logscale = self.prior_head(feature).chunk(2, dim=1)
        logscale = F.softplus(logscale + PRIOR_LOGSCALE_FLOOR) - PRIOR_LOGSCALE_FLOOR
        return feature, pm, torch.exp(logscale)

    def posterior_mean(self, feature: Tensor, enc_feature: Tensor) -> Tensor:
        """The centre of the unit-width uniform posterior q(z | x, z_<i)."""
        return self.posterior(torch.cat([feature, enc_feature], dim=1))

    def merge(self, feature: Tensor, z: Tensor) -> Tensor:
        """Add the latent's information to the features."""
        return self.end(feature + self.z_proj(z))
