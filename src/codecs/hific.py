"""HiFIC (Mentzer et al., NeurIPS 2020): the generative codec's encoder, generator and hyperprior.

The encoder E and generator G use ChannelNorm (per-pixel normalisation over channels) and
reflection padding; the latent y (`M` = 220 channels at 1/16 resolution) is coded under a
mean-scale Gaussian conditioned on a hyperlatent z (`hyper_channels` = 320 at 1/64), whose own
density is Ballé's non-parametric factorized one. G decodes the mean-offset rounded latent
round(y − μ) + μ, straight-through in training, so the decoder sees exactly what the bitstream
carries. Real coding is CompressAI's rANS (`EntropyBottleneck` for z, `GaussianConditional` with
64 log-spaced scales in [0.11, 256] for y).

The discriminator is a training-only part and lives with the recipe
(`src/losses/adversarial.py`); a saved codec is the generator side alone.
"""

from __future__ import annotations

import math
from collections.abc import Iterator

import torch
from compressai.entropy_models import EntropyBottleneck, GaussianConditional
from compressai.ops import quantize_ste
from torch import Tensor, nn

from src.codecs.base import Codec, CodecOutput
from src.codecs.compressai_zoo import bits_from_likelihoods

# The port's Gaussian coding tables: 64 log-spaced scales in [0.11, 256] (also CompressAI's).
SCALE_MIN, SCALE_MAX, NUM_SCALES = 0.11, 256.0, 64
N_DOWNSAMPLING = 4


def scale_table() -> Tensor:
    """The σ values of the latent's coding tables."""
    return torch.logspace(math.log10(SCALE_MIN), math.log10(SCALE_MAX), NUM_SCALES)


class ChannelNorm(nn.Module):
    """Normalise each pixel over its channels (unbiased variance, ε = 1e-3), then scale and shift.

    Unlike InstanceNorm it has no spatial statistics, so a codec trained on 256² crops behaves the
    same on full-resolution images (the paper's reason for it).
    """

    def __init__(self, channels: int, eps: float = 1e-3) -> None:
        super().__init__()
        self.eps = eps
        self.gamma = nn.Parameter(torch.ones(1, channels, 1, 1))
        self.beta = nn.Parameter(torch.zeros(1, channels, 1, 1))

    def forward(self, x: Tensor) -> Tensor:
        mean = x.mean(dim=1, keepdim=True)
        var = x.var(dim=1, keepdim=True, unbiased=x.shape[1] > 1)
        return (x - mean) * torch.rsqrt(var + self.eps) * self.gamma + self.beta


def _conv(c_in: int, c_out: int, kernel: int) -> nn.Sequential:
    """A stride-1 convolution with reflection padding that keeps the size."""
    return nn.Sequential(nn.ReflectionPad2d(kernel // 2), nn.Conv2d(c_in, c_out, kernel))


class Encoder(nn.Module):
    """E: 7×7 conv to N, four stride-2 3×3 downsamplings doubling the width, 3×3 conv to M."""

    def __init__(self, N: int, M: int) -> None:
        super().__init__()
        layers: list[nn.Module] = [_conv(3, N, 7), ChannelNorm(N), nn.ReLU()]
        width = N
        for _ in range(N_DOWNSAMPLING):
            layers += [
                nn.ReflectionPad2d((0, 1, 1, 0)),  # asymmetric: H → H/2 exactly
                nn.Conv2d(width, 2 * width, 3, stride=2),
                ChannelNorm(2 * width),
                nn.ReLU(),
            ]
            width *= 2
        layers.append(_conv(width, M, 3))
        self.net = nn.Sequential(*layers)

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)


class ResidualBlock(nn.Module):
    """pad → conv3×3 → CN → ReLU → pad → conv3×3 → CN, plus the identity."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.body = nn.Sequential(
            _conv(channels, channels, 3),
            ChannelNorm(channels),
            nn.ReLU(),
            _conv(channels, channels, 3),
            ChannelNorm(channels),
        )

    def forward(self, x: Tensor) -> Tensor:
        return x + self.body(x)


class Generator(nn.Module):
    """G: CN, 3×3 conv to 16N, residual blocks with a global skip, four ×2 transposed convs, 7×7."""

    def __init__(self, N: int, M: int, n_residual_blocks: int) -> None:
        super().__init__()
        width = N * 2**N_DOWNSAMPLING
        self.head = nn.Sequential(ChannelNorm(M), _conv(M, width, 3), ChannelNorm(width))
        self.blocks = nn.Sequential(*(ResidualBlock(width) for _ in range(n_residual_blocks)))
        layers: list[nn.Module] = []
        for _ in range(N_DOWNSAMPLING):
            layers += [
                nn.ConvTranspose2d(width, width // 2, 3, stride=2, padding=1, output_padding=1),
                ChannelNorm(width // 2),
                nn.ReLU(),
            ]
            width //= 2
        layers.append(_conv(width, 3, 7))
        self.tail = nn.Sequential(*layers)

    def forward(self, y_hat: Tensor) -> Tensor:
        head = self.head(y_hat)
        return self.tail(head + self.blocks(head))


def _hyper_synthesis(hyper_channels: int, M: int) -> nn.Sequential:
    """ConvT5×5 s2 → ReLU → ConvT5×5 s2 → ReLU → ConvT3×3 s1, from z's width to M."""
    c = hyper_channels
    return nn.Sequential(
        nn.ConvTranspose2d(c, c, 5, stride=2, padding=2, output_padding=1),
        nn.ReLU(),
        nn.ConvTranspose2d(c, c, 5, stride=2, padding=2, output_padding=1),
        nn.ReLU(),
        nn.ConvTranspose2d(c, M, 3, stride=1, padding=1),
    )


class HificCodec(Codec):
    """HiFIC's compression network: encoder, generator and mean-scale hyperprior.

    Args:
        N: width of the first encoder layer (paper 60); it doubles at each of the four
            downsamplings, so the generator's residual blocks run at 16·N (960).
        M: latent channels C (paper 220).
        hyper_channels: hyperlatent channels (paper 320).
        n_residual_blocks: residual blocks of the generator (paper 9).
        signed_io: map images to [-1, 1] on the way in and squash the output with tanh, as the
            published low/high models (`-norm`); otherwise [0, 1] in and an unbounded output.
    """

    name = "hific"
    stride = 2**N_DOWNSAMPLING * 4  # the image's 16 and the hyperprior's two stride-2 steps
    num_streams = 2  # y, then z

    def __init__(
        self,
        N: int = 60,
        M: int = 220,
        hyper_channels: int = 320,
        n_residual_blocks: int = 9,
        signed_io: bool = True,
    ) -> None:
        super().__init__()
        self._record_config(
            N=N,
            M=M,
            hyper_channels=hyper_channels,
            n_residual_blocks=n_residual_blocks,
            signed_io=signed_io,
        )
        self.signed_io = signed_io
        self.latent_channels = M
        self.n_residual_blocks = n_residual_blocks
        self.latent_stride = 2**N_DOWNSAMPLING
        self.encoder = Encoder(N, M)
        self.generator = Generator(N, M, n_residual_blocks)
        self.hyper_analysis = nn.Sequential(
            nn.Conv2d(M, hyper_channels, 3, padding=1),
            nn.ReLU(),
            nn.Conv2d(hyper_channels, hyper_channels, 5, stride=2, padding=2),
            nn.ReLU(),
            nn.Conv2d(hyper_channels, hyper_channels, 5, stride=2, padding=2),
        )
        self.hyper_mean = _hyper_synthesis(hyper_channels, M)
        self.hyper_scale = _hyper_synthesis(hyper_channels, M)
        self.entropy_bottleneck = EntropyBottleneck(hyper_channels)
        self.gaussian_conditional = GaussianConditional(None, scale_bound=SCALE_MIN)

    # ---- parts --------------------------------------------------------------------------------
    def parts(self) -> dict[str, list[nn.Module]]:
        """The modules of each part, for parameter counts: encoder, generator, hyperprior."""
        return {
            "encoder": [self.encoder],
            "generator": [self.generator],
            "hyperprior": [
                self.hyper_analysis,
                self.hyper_mean,
                self.hyper_scale,
                self.entropy_bottleneck,
            ],
        }

    def _encode(self, x: Tensor) -> Tensor:
        return self.encoder(x * 2 - 1 if self.signed_io else x)

    def _decode(self, y_hat: Tensor) -> Tensor:
        out = self.generator(y_hat)
        return (torch.tanh(out) + 1) / 2 if self.signed_io else out

    def _forward_padded(self, x: Tensor) -> CodecOutput:
        y = self._encode(x)
        z = self.hyper_analysis(y)
        # Noisy z in training, rounded around the medians in eval (as coding does).
        z_hat, z_likelihoods = self.entropy_bottleneck(z)
        means, scales = self.hyper_mean(z_hat), self.hyper_scale(z_hat)
        # Rate of y: likelihood of y + U(-½, ½) in training, of the rounded y in eval.
        _, y_likelihoods = self.gaussian_conditional(y, scales, means=means)
        # The generator sees the mean-offset rounded latent, straight-through in training.
        y_hat = quantize_ste(y - means) + means
        x_hat = self._decode(y_hat)
        bits = {
            "y": bits_from_likelihoods(y_likelihoods),
            "z": bits_from_likelihoods(z_likelihoods),
        }
        if self.training:
            with torch.no_grad():  # the rates of the rounded latents: what a coder would spend
                _, q_y = self.gaussian_conditional(y, scales, means=means, training=False)
                _, q_z = self.entropy_bottleneck(z, training=False)
            quantized_bits = bits_from_likelihoods(q_y) + bits_from_likelihoods(q_z)
        else:  # eval already rated the rounded latents
            quantized_bits = (bits["y"] + bits["z"]).detach()
        return CodecOutput(
            x_hat=x_hat, bits=bits, extras={"y_hat": y_hat, "quantized_bits": quantized_bits}
        )

    # ---- coding -------------------------------------------------------------------------------
    def _compress_padded(self, x: Tensor) -> tuple[list[bytes], tuple[int, ...]]:
        y = self._encode(x)
        z = self.hyper_analysis(y)
        z_strings = self.entropy_bottleneck.compress(z)
        z_hat = self.entropy_bottleneck.decompress(z_strings, z.shape[-2:])
        means, scales = self.hyper_mean(z_hat), self.hyper_scale(z_hat)
        indexes = self.gaussian_conditional.build_indexes(scales)
        y_strings = self.gaussian_conditional.compress(y, indexes, means=means)
        return [y_strings[0], z_strings[0]], (int(z.shape[-2]), int(z.shape[-1]))

    def _decompress_padded(self, streams: list[bytes], latent_shape: tuple[int, ...]) -> Tensor:
        y_stream, z_stream = streams
        z_hat = self.entropy_bottleneck.decompress([z_stream], latent_shape)
        means, scales = self.hyper_mean(z_hat), self.hyper_scale(z_hat)
        indexes = self.gaussian_conditional.build_indexes(scales)
        y_hat = self.gaussian_conditional.decompress([y_stream], indexes, means=means)
        return self._decode(y_hat)

    def prepare_for_coding(self) -> None:
        self.entropy_bottleneck.update(force=True)
        self.gaussian_conditional.update_scale_table(scale_table(), force=True)

    def aux_loss(self) -> Tensor:
        return self.entropy_bottleneck.loss()

    def aux_parameters(self) -> Iterator[nn.Parameter]:
        return (p for n, p in self.entropy_bottleneck.named_parameters() if n == "quantiles")

    def entropy_parameters(self) -> Iterator[nn.Parameter]:
        return (p for n, p in self.entropy_bottleneck.named_parameters() if n != "quantiles")
