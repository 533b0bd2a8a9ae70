"""HiFIC (Mentzer et al., NeurIPS 2020): the generative codec's encoder, generator and hyperprior.

The encoder E and generator G use ChannelNorm (per-pixel normalisation over channels) and
reflection padding; the latent y (`M` = 220 channels at 1/16 resolution) is coded under a
mean-scale Gaussian (or logistic) conditioned on a hyperlatent z (`hyper_channels` = 320 at 1/64),
whose own density is Ballé's non-parametric factorized one (filters (3, 3, 3), as both references).
G decodes the mean-offset rounded latent round(y − μ) + μ, straight-through in training, so the
decoder sees exactly what the bitstream carries. Real coding is CompressAI's rANS
(`EntropyBottleneck` for z, `GaussianConditional` with 64 log-spaced scales in [0.11, 256] for y).

Images are padded to a multiple of 16, as both references do: z comes from stride-2 convolutions
that round up, and the hyper-synthesis outputs (4·⌈h/4⌉ rows) are cropped to y's h rows, as the TF
reference does, so no latent is coded for padding beyond 16.

The discriminator is a training-only part and lives with the recipe
(`src/losses/adversarial.py`); a saved codec is the generator side alone. The PyTorch port's
released weights import with `lic import hific-port` (`read_port_file` below).
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from typing import Any

import scipy.stats
import torch
import torch.nn.functional as F
from compressai.entropy_models import EntropyBottleneck, GaussianConditional
from compressai.ops import quantize_ste
from torch import Tensor, nn

from src.codecs.base import Codec, CodecOutput
from src.codecs.compressai_zoo import bits_from_likelihoods
from src.codecs.importing import (
    ImportRequest,
    fit_state,
    read_torch_file,
    register_format,
    rename_state,
)
from src.errors import CheckpointError, ConfigError

# The port's Gaussian coding tables: 64 log-spaced scales in [0.11, 256] (also CompressAI's).
SCALE_MIN, SCALE_MAX, NUM_SCALES = 0.11, 256.0, 64
N_DOWNSAMPLING = 4
HYPER_DOWNSAMPLING = 2  # the hyper-analysis's two stride-2 convolutions
LIKELIHOODS = ("gaussian", "logistic")
HYPER_PADDINGS = ("zeros", "reflect")


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


def _hyper_analysis_net(M: int, hyper_channels: int, padding: str) -> nn.Sequential:
    """Conv3×3 → ReLU → Conv5×5 s2 → ReLU → Conv5×5 s2; the stride-2 convs pad by `padding`
    (the TF reference zeros, the PyTorch port reflection)."""
    c = hyper_channels
    return nn.Sequential(
        nn.Conv2d(M, c, 3, padding=1),
        nn.ReLU(),
        nn.Conv2d(c, c, 5, stride=2, padding=2, padding_mode=padding),
        nn.ReLU(),
        nn.Conv2d(c, c, 5, stride=2, padding=2, padding_mode=padding),
    )


class LogisticConditional(GaussianConditional):
    """CompressAI's conditional model with a logistic instead of a Gaussian (the port's
    `likelihood_type=logistic`, its HiFIC-med release): same scales, tables and coding."""

    def _standardized_cumulative(self, inputs: Tensor) -> Tensor:
        return torch.sigmoid(inputs)

    @staticmethod
    def _standardized_quantile(quantile: float) -> float:
        return float(scipy.stats.logistic.ppf(quantile))


class FactorizedDensity(EntropyBottleneck):
    """CompressAI's factorized density, optionally with the PyTorch port's gate on its output
    layer too (`final_factor`: logits + tanh(a)·tanh(logits) after the last layer as well)."""

    def __init__(self, channels: int, filters: Sequence[int], final_factor: bool = False) -> None:
        super().__init__(channels, filters=tuple(filters))
        if final_factor:
            self.factors.append(nn.Parameter(torch.zeros(channels, 1, 1)))

    def _logits_cumulative(self, inputs: Tensor, stop_gradient: bool) -> Tensor:
        logits = inputs
        for i, (matrix, bias) in enumerate(zip(self.matrices, self.biases)):
            matrix, bias = (matrix.detach(), bias.detach()) if stop_gradient else (matrix, bias)
            logits = torch.matmul(F.softplus(matrix), logits) + bias
            if i < len(self.factors):
                factor = self.factors[i].detach() if stop_gradient else self.factors[i]
                logits = logits + torch.tanh(factor) * torch.tanh(logits)
        return logits

    @torch.no_grad()
    def fit_quantiles(self, iterations: int = 64, bound: float = 1e4) -> None:
        """Set the quantiles (lower tail, median, upper tail) from the density by bisection, for
        a density trained without them (the port estimates its tails when it builds tables)."""
        target = self.target.view(1, 1, 3)
        lo = torch.full_like(self.quantiles, -bound)
        hi = torch.full_like(self.quantiles, bound)
        for _ in range(iterations):  # the cumulative's logits rise monotonically with x
            mid = (lo + hi) / 2
            below = self._logits_cumulative(mid, stop_gradient=True) < target
            lo, hi = torch.where(below, mid, lo), torch.where(below, hi, mid)
        self.quantiles.copy_((lo + hi) / 2)


def hyper_size(latent_size: int) -> int:
    """Rows (or columns) of z for a latent of `latent_size`: each stride-2 conv rounds up."""
    for _ in range(HYPER_DOWNSAMPLING):
        latent_size = -(-latent_size // 2)
    return latent_size


class HificCodec(Codec):
    """HiFIC's compression network: encoder, generator and mean-scale hyperprior.

    Args:
        N: width of the first encoder layer (paper 60); it doubles at each of the four
            downsamplings, so the generator's residual blocks run at 16·N (960).
        M: latent channels C (paper 220).
        hyper_channels: hyperlatent channels (paper 320).
        n_residual_blocks: residual blocks of the generator (paper 9).
        signed_io: map images to [-1, 1] on the way in and squash the output with tanh, as the
            port's published low/high models (`-norm`); otherwise [0, 1] in and an unbounded
            output, as the TF reference.
        density_filters: hidden widths of z's factorized density ((3, 3, 3) in both references;
            CompressAI's default is (3, 3, 3, 3)).
        density_final_factor: gate the density's output layer too, as the PyTorch port does.
        hyper_padding: "zeros" (TF reference) or "reflect" (PyTorch port) in the hyper-analysis's
            stride-2 convolutions. Reflection needs at least 5 latent rows and columns (images
            above 64 px a side, as in the port).
        likelihood: "gaussian" (paper) or "logistic" (the port's HiFIC-med).
    """

    name = "hific"
    stride = 2**N_DOWNSAMPLING  # images pad to 16; the hyperprior's outputs are cropped to y
    num_streams = 2  # y, then z

    def __init__(
        self,
        N: int = 60,
        M: int = 220,
        hyper_channels: int = 320,
        n_residual_blocks: int = 9,
        signed_io: bool = True,
        density_filters: Sequence[int] = (3, 3, 3),
        density_final_factor: bool = False,
        hyper_padding: str = "zeros",
        likelihood: str = "gaussian",
    ) -> None:
        super().__init__()
        if hyper_padding not in HYPER_PADDINGS:
            raise ConfigError(
                f"hyper_padding must be one of {HYPER_PADDINGS}, got {hyper_padding!r}"
            )
        if likelihood not in LIKELIHOODS:
            raise ConfigError(f"likelihood must be one of {LIKELIHOODS}, got {likelihood!r}")
        density_filters = tuple(int(f) for f in density_filters)
        self._record_config(
            N=N,
            M=M,
            hyper_channels=hyper_channels,
            n_residual_blocks=n_residual_blocks,
            signed_io=signed_io,
            density_filters=list(density_filters),
            density_final_factor=density_final_factor,
            hyper_padding=hyper_padding,
            likelihood=likelihood,
        )
        self.hyper_padding = hyper_padding
        # The encoder's last 3×3 reflection needs 2 rows at 1/16, the port's reflecting
        # hyper-analysis 5 rows of y: smaller images are padded up to that.
        self.min_side = 5 * self.stride if hyper_padding == "reflect" else 2 * self.stride
        self.signed_io = signed_io
        self.latent_channels = M
        self.n_residual_blocks = n_residual_blocks
        self.latent_stride = 2**N_DOWNSAMPLING
        self.encoder = Encoder(N, M)
        self.generator = Generator(N, M, n_residual_blocks)
        self.hyper_analysis = _hyper_analysis_net(M, hyper_channels, hyper_padding)
        self.hyper_mean = _hyper_synthesis(hyper_channels, M)
        self.hyper_scale = _hyper_synthesis(hyper_channels, M)
        self.entropy_bottleneck = FactorizedDensity(
            hyper_channels, density_filters, density_final_factor
        )
        conditional = LogisticConditional if likelihood == "logistic" else GaussianConditional
        self.gaussian_conditional = conditional(None, scale_bound=SCALE_MIN)

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

    def hyper_latent(self, y: Tensor) -> Tensor:
        """z from y (at least 5 × 5 under reflect padding: `min_side`)."""
        return self.hyper_analysis(y)

    def hyper_parameters(self, z_hat: Tensor, latent_size: Sequence[int]) -> tuple[Tensor, Tensor]:
        """y's means and scales from the quantised z, cropped to y's `latent_size` (h, w)."""
        h, w = latent_size
        means = self.hyper_mean(z_hat)[..., :h, :w]
        scales = self.hyper_scale(z_hat)[..., :h, :w]
        return means, scales

    def _forward_padded(self, x: Tensor) -> CodecOutput:
        y = self._encode(x)
        z = self.hyper_latent(y)
        # Noisy z in training, rounded around the medians in eval (as coding does).
        z_hat, z_likelihoods = self.entropy_bottleneck(z)
        means, scales = self.hyper_parameters(z_hat, y.shape[-2:])
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
        z = self.hyper_latent(y)
        z_strings = self.entropy_bottleneck.compress(z)
        z_hat = self.entropy_bottleneck.decompress(z_strings, z.shape[-2:])
        means, scales = self.hyper_parameters(z_hat, y.shape[-2:])
        indexes = self.gaussian_conditional.build_indexes(scales)
        y_strings = self.gaussian_conditional.compress(y, indexes, means=means)
        return [y_strings[0], z_strings[0]], (int(y.shape[-2]), int(y.shape[-1]))

    def _decompress_padded(self, streams: list[bytes], latent_shape: tuple[int, ...]) -> Tensor:
        """`latent_shape` is y's (h, w); z's follows from it (`hyper_size`)."""
        y_stream, z_stream = streams
        z_shape = tuple(hyper_size(int(n)) for n in latent_shape)
        z_hat = self.entropy_bottleneck.decompress([z_stream], z_shape)
        means, scales = self.hyper_parameters(z_hat, latent_shape)
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


# ---- the PyTorch port's released weights (`lic import hific-port FILE OUT.ckpt`) ------------------
PORT_PUBLISHED_AT = (
    "the README of github.com/Justin-Tan/high-fidelity-generative-compression "
    "(HiFIC-low, -med and -high, linked to Google Drive)"
)
# The port's module names -> ours; the encoder's and generator's Sequential indices shift
# because our padding layers sit inside `_conv` blocks.
PORT_RULES: list[tuple[str, str]] = [
    (r"^Encoder\.conv_block1\.1\.", "encoder.net.0.1."),
    (r"^Encoder\.conv_block1\.2\.", "encoder.net.1."),
    *[(rf"^Encoder\.conv_block{k}\.1\.", f"encoder.net.{4 * k - 4}.") for k in range(2, 6)],
    *[(rf"^Encoder\.conv_block{k}\.2\.", f"encoder.net.{4 * k - 3}.") for k in range(2, 6)],
    (r"^Encoder\.conv_block_out\.1\.", "encoder.net.19.1."),
    (r"^Generator\.conv_block_init\.0\.", "generator.head.0."),
    (r"^Generator\.conv_block_init\.2\.", "generator.head.1.1."),
    (r"^Generator\.conv_block_init\.3\.", "generator.head.2."),
    (r"^Generator\.resblock_(\d+)\.conv1\.", r"generator.blocks.\1.body.0.1."),
    (r"^Generator\.resblock_(\d+)\.norm1\.", r"generator.blocks.\1.body.1."),
    (r"^Generator\.resblock_(\d+)\.conv2\.", r"generator.blocks.\1.body.3.1."),
    (r"^Generator\.resblock_(\d+)\.norm2\.", r"generator.blocks.\1.body.4."),
    *[(rf"^Generator\.upconv_block{j}\.0\.", f"generator.tail.{3 * j - 3}.") for j in range(1, 5)],
    *[(rf"^Generator\.upconv_block{j}\.1\.", f"generator.tail.{3 * j - 2}.") for j in range(1, 5)],
    (r"^Generator\.conv_block_out\.1\.", "generator.tail.12.1."),
    *[
        (rf"^Hyperprior\.analysis_net\.conv{k}\.", f"hyper_analysis.{2 * k - 2}.")
        for k in (1, 2, 3)
    ],
    *[(rf"^Hyperprior\.synthesis_mu\.conv{k}\.", f"hyper_mean.{2 * k - 2}.") for k in (1, 2, 3)],
    *[(rf"^Hyperprior\.synthesis_std\.conv{k}\.", f"hyper_scale.{2 * k - 2}.") for k in (1, 2, 3)],
    (r"^Hyperprior\.hyperlatent_likelihood\.H_(\d+)$", r"entropy_bottleneck.matrices.\1"),
    (r"^Hyperprior\.hyperlatent_likelihood\.a_(\d+)$", r"entropy_bottleneck.factors.\1"),
    (r"^Hyperprior\.hyperlatent_likelihood\.b_(\d+)$", r"entropy_bottleneck.biases.\1"),
]
# Training-only parts (the discriminator) and the port's own coding tables (rebuilt here).
PORT_DROP = [
    r"Discriminator\..*",
    r"Hyperprior\.(hyperprior_entropy_model|prior_entropy_model|prior_density)\..*",
]


def port_codec_config(state: dict[str, Any], args: dict[str, Any]) -> dict[str, Any]:
    """Our codec's arguments for a port state dict (under our names; tensors or shapes) and the
    `args` the port saved beside it."""
    if args.get("use_latent_mixture_model") or args.get("sample_noise"):
        raise CheckpointError(
            "this port model uses a latent mixture model or generator noise; "
            "only the released HiFIC configuration (Gaussian or logistic latents) imports"
        )
    if args.get("use_channel_norm", True) is False:
        raise CheckpointError("this port model uses instance norm; HiFIC's ChannelNorm is needed")

    def shape(key: str) -> tuple[int, ...]:
        if key not in state:
            raise CheckpointError(f"not a HiFIC port state dict: {key} is missing")
        return tuple(getattr(state[key], "shape", state[key]))

    matrices = sorted(k for k in state if k.startswith("entropy_bottleneck.matrices."))
    return {
        "N": shape("encoder.net.0.1.weight")[0],
        "M": shape("encoder.net.19.1.weight")[0],
        "hyper_channels": shape("hyper_analysis.0.weight")[0],
        "n_residual_blocks": len({k.split(".")[2] for k in state if ".blocks." in k}),
        "signed_io": bool(args.get("normalize_input_image", False)),
        "density_filters": [shape(k)[1] for k in matrices[:-1]],
        "density_final_factor": True,
        "hyper_padding": "reflect",
        "likelihood": str(args.get("likelihood_type", "gaussian")),
    }


def coding_buffers(codec: HificCodec) -> dict[str, Tensor]:
    """The codec's buffers that the port's files do not hold: coding tables and constants,
    which `prepare_for_coding` rebuilds."""
    params = dict(codec.named_parameters())
    return {k: v for k, v in codec.state_dict().items() if k not in params}


@register_format(
    "hific-port",
    published_at=PORT_PUBLISHED_AT,
    help="HiFIC's PyTorch port (Justin-Tan): HiFIC-low/med/high .pt files",
)
def read_port_file(request: ImportRequest) -> HificCodec:
    """A released port file (`model_state_dict` + `args`) as our codec: the networks renamed,
    the density's quantiles found by bisection, `--option signed_io=...|likelihood=...` for a
    bare state dict without its `args`."""
    saved = read_torch_file(request.source, "a HiFIC port checkpoint")
    if not isinstance(saved, dict):
        raise CheckpointError(f"{request.source} is not a HiFIC port checkpoint (no dict inside)")
    state = saved.get("model_state_dict", saved)
    args = {**(saved.get("args") or {}), **_port_options(request.options)}
    state = rename_state(state, PORT_RULES, drop=PORT_DROP)
    codec = HificCodec(**port_codec_config(state, args))
    state["entropy_bottleneck.quantiles"] = codec.entropy_bottleneck.quantiles.detach()
    for key, value in coding_buffers(codec).items():
        state.setdefault(key, value)
    fit_state(codec, state, str(request.source))
    codec.entropy_bottleneck.fit_quantiles()
    return codec


def _port_options(options: dict[str, Any]) -> dict[str, Any]:
    """`--option` values under the port's own `args` names."""
    names = {"signed_io": "normalize_input_image", "likelihood": "likelihood_type"}
    unknown = sorted(set(options) - set(names))
    if unknown:
        raise CheckpointError(f"hific-port takes the options {sorted(names)}, not {unknown}")
    return {names[k]: bool(v) if k == "signed_io" else v for k, v in options.items()}
