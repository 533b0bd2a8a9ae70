"""QVRF: one CompressAI backbone coding at every rate through a quantisation gain.

Tong et al., "QVRF: a quantization-error-aware variable rate framework for learned image
compression" (ICIP 2023). The backbone (Cheng 2020 attention, Ballé's scale hyperprior, Minnen's
mean-scale or joint model) is CompressAI's own, reached at `codec.net` exactly as in the
fixed-rate `CompressAICodec`, so a fixed-rate checkpoint of this framework loads into it. The
variable-rate part is one gain vector `a` with one entry per Lagrange multiplier: the latent is
quantised on a grid of step 1/a around its predicted mean and coded under the backbone's
Gaussian with its scale multiplied by a,

    q = round(a · (y − μ)),   ŷ = q / a + μ,   q ~ N(0, (a·σ)²) integrated over unit bins,

so a larger gain spends more bits. The hyperlatent z keeps its unit step at every rate. In
training the rounding is replaced by uniform noise of the quantisation error's own width,
ỹ = (a·y + u) / a with u ~ U(−½, ½) (stages 1–2), or by a straight-through rounding (stage 3).
One entry, the anchor (index 0 by default, as in the authors' code; STF-QVRF anchors at the λ of
its pretrained model), is fixed at a = 1; the others start at √(λ_s / λ_anchor) and are learnt.
A continuous
`factor` is used as the gain itself, so factors between two trained gains give rates between
theirs.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from compressai.ans import RansDecoder, RansEncoder
from compressai.models import MeanScaleHyperprior
from compressai.ops import quantize_ste
from compressai.zoo.image import cfgs
from torch import Tensor, nn

from src.codecs.base import CodecOutput
from src.codecs.compressai_zoo import (
    CompressAICodec,
    bits_from_likelihoods,
    compressai_state,
    zoo_widths,
)
from src.codecs.importing import (
    ImportRequest,
    fit_state,
    read_torch_file,
    register_format,
    rename_state,
)
from src.coding.container import BitstreamError, Rate
from src.errors import CheckpointError, ConfigError, LicError
from src.losses.rate_distortion import LMBDA_LADDER

# The backbones the gain fits: every CompressAI model with a Gaussian conditional on y.
BACKBONES = (
    "bmshj2018-hyperprior",
    "mbt2018-mean",
    "mbt2018",
    "cheng2020-anchor",
    "cheng2020-attn",
)

# CompressAI's MSE ladder (quality 1..8) and the QVRF authors' extension for high rates.
LMBDA_SETS: dict[str, tuple[float, ...]] = {
    "compressai": LMBDA_LADDER["mse"],
    "extended": LMBDA_LADDER["mse"] + (0.36, 0.72, 1.44),
}

MIN_GAIN = 1e-4
QUANTIZERS = ("noise", "ste")
_KERNEL = 5  # the autoregressive context model's kernel (CompressAI's joint models)
_PAD = _KERNEL // 2


def resolve_lmbda_set(spec: str | Sequence[float]) -> tuple[float, ...]:
    """The λ values of a named set ("compressai", "extended") or of an explicit increasing list."""
    if isinstance(spec, str):
        if spec not in LMBDA_SETS:
            raise ConfigError(
                f"model.lmbda_set must be one of {sorted(LMBDA_SETS)} or a list, got {spec!r}"
            )
        return LMBDA_SETS[spec]
    values = tuple(float(v) for v in spec)
    if len(values) < 2 or any(v <= 0 for v in values) or list(values) != sorted(set(values)):
        raise ConfigError(
            f"model.lmbda_set must list at least two increasing positive λ, got {list(values)}"
        )
    return values


def _dequantize(q: Tensor, a: Tensor, means: Tensor | None) -> Tensor:
    """ŷ = q / a (+ μ): the one place where symbols become latents, for coder and forward alike."""
    y_hat = q / a
    return y_hat if means is None else y_hat + means


def _symbols(y: Tensor, a: Tensor, means: Tensor | None) -> Tensor:
    """q = round(a · (y − μ)): the integers the entropy coder writes."""
    return torch.round(a * (y if means is None else y - means))


class QvrfCodec(CompressAICodec):
    """A CompressAI backbone with QVRF's learnt quantisation gains: one model, every rate.

    Args:
        arch: the backbone, one of `BACKBONES` ("_" or "-" both accepted).
        quality: picks the backbone's widths from CompressAI's table (6: the paper's 192 / 320).
        N, M: override the widths (tiny models for tests).
        lmbda_set: "compressai" (8 λ), "extended" (11 λ) or an increasing list; one gain per λ.
        anchor: the rate index whose gain is fixed at 1 (the fixed-rate model's λ); the other
            gains start at √(λ_s / λ_anchor).
    """

    def __init__(
        self,
        arch: str = "cheng2020-attn",
        quality: int = 6,
        N: int | None = None,
        M: int | None = None,
        lmbda_set: str | Sequence[float] = "compressai",
        anchor: int = 0,
    ) -> None:
        arch = arch.replace("_", "-")
        if arch not in BACKBONES:
            raise ConfigError(f"model.backbone must be one of {BACKBONES}, got {arch!r}")
        super().__init__(arch, quality, N, M)
        self.lmbdas = resolve_lmbda_set(lmbda_set)
        recorded = lmbda_set if isinstance(lmbda_set, str) else list(self.lmbdas)
        self.num_rates = len(self.lmbdas)
        if not 0 <= anchor < self.num_rates:
            raise ConfigError(
                f"model.anchor must be a rate index 0..{self.num_rates - 1} of the λ set, got {anchor}"
            )
        self._record_config(arch=arch, quality=quality, N=N, M=M, lmbda_set=recorded, anchor=anchor)
        self.name = f"qvrf-{arch}"
        self.anchor = anchor
        initial = [math.sqrt(lmbda / self.lmbdas[anchor]) for lmbda in self.lmbdas]
        self.gain = nn.Parameter(torch.tensor(initial))
        # The paper's factor range [0.5, 12] for gains 1..10, relative to the set's own gains.
        self.factor_range = (0.5 * min(initial), 1.2 * max(initial))
        self.mean_scale = isinstance(self.net, MeanScaleHyperprior)
        self.quantizer = "noise"
        self._rate = Rate.index(anchor)

    # ---- rates --------------------------------------------------------------------------------
    def set_rate(self, rate: Rate) -> None:
        """Code at a trained index 0..num_rates-1 or at a continuous factor (the gain itself)."""
        if rate.kind == "index":
            if not 0 <= rate.value < self.num_rates:
                raise LicError(
                    f"{self.name} has rate indices 0..{self.num_rates - 1}, not {int(rate.value)}"
                )
        else:
            low, high = self.factor_range
            if not low <= rate.value <= high:
                raise LicError(
                    f"{self.name} takes factors in [{low:g}, {high:g}], not {rate.value:g}"
                )
        self._rate = rate

    def current_rate(self) -> Rate:
        return self._rate

    def set_quantizer(self, quantizer: str) -> None:
        """Training-time stand-in for rounding: "noise" (stages 1–2) or "ste" (stage 3)."""
        if quantizer not in QUANTIZERS:
            raise ConfigError(f"QVRF quantizer must be one of {QUANTIZERS}, got {quantizer!r}")
        self.quantizer = quantizer

    def current_gain(self) -> Tensor:
        """The gain a of the current rate: trainable for indices other than the anchor."""
        if self._rate.kind == "factor":
            return self.gain.new_tensor(self._rate.value)
        index = int(self._rate.value)
        gain = self.gain[index]
        if index == self.anchor:  # fixed, yet in the graph with a zero gradient, as DDP expects
            gain = gain.detach() + 0 * gain
        return gain.clamp(min=MIN_GAIN)

    # ---- shared pieces ------------------------------------------------------------------------
    def _hyper(self, y: Tensor) -> Tensor:
        return self.net.h_a(y if self.mean_scale else torch.abs(y))

    def _split(self, gaussian_params: Tensor) -> tuple[Tensor, Tensor | None]:
        """(scales, means) of the backbone's entropy parameters (means None: a scale-only prior)."""
        if not self.mean_scale:
            return gaussian_params, None
        scales, means = gaussian_params.chunk(2, 1)
        return scales, means

    def _y_bits(self, values: Tensor, scales: Tensor, a: Tensor) -> Tensor:
        """Bits of the scaled, mean-centred values under N(0, a·σ) with unit bins."""
        conditional = self.net.gaussian_conditional
        likelihood = conditional._likelihood(values, a * scales)
        if conditional.use_likelihood_bound:
            likelihood = conditional.likelihood_lower_bound(likelihood)
        return bits_from_likelihoods(likelihood)

    def _context_params(self, params: Tensor, y_hat: Tensor) -> tuple[Tensor, Tensor | None]:
        """Entropy parameters of every position at once (training: ŷ is known everywhere)."""
        ctx = self.net.context_prediction(y_hat)
        return self._split(self.net.entropy_parameters(torch.cat((params, ctx), dim=1)))

    @torch.no_grad()
    def _raster(
        self, params: Tensor, a: Tensor, next_symbols: Callable[[Tensor, Tensor, int, int], Tensor]
    ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """Walk an autoregressive latent in raster order: each position's mean and scale come
        from the hyperprior and the already quantised neighbours, then `next_symbols(scales,
        means, i, j)` gives its symbols (rounded by the encoder, read by the decoder).

        Encoder, decoder and the test-mode forward pass run these very operations on the same
        values, so the decoder rebuilds ŷ bit for bit. Returns ŷ, the symbols, scales and means.
        """
        net = self.net
        b, _, height, width = params.shape
        channels = net.context_prediction.in_channels
        y_pad = params.new_zeros(b, channels, height + 2 * _PAD, width + 2 * _PAD)
        symbols = params.new_zeros(b, channels, height, width)
        scales_all = torch.zeros_like(symbols)
        means_all = torch.zeros_like(symbols)
        weight = net.context_prediction.weight * net.context_prediction.mask
        for i in range(height):
            for j in range(width):
                window = y_pad[:, :, i : i + _KERNEL, j : j + _KERNEL]
                ctx = F.conv2d(window, weight, bias=net.context_prediction.bias)
                p = params[:, :, i : i + 1, j : j + 1]
                scales, means = self._split(net.entropy_parameters(torch.cat((p, ctx), dim=1)))
                q = next_symbols(scales, means, i, j)
                y_pad[:, :, _PAD + i : _PAD + i + 1, _PAD + j : _PAD + j + 1] = _dequantize(
                    q, a, means
                )
                symbols[:, :, i : i + 1, j : j + 1] = q
                scales_all[:, :, i : i + 1, j : j + 1] = scales
                means_all[:, :, i : i + 1, j : j + 1] = means
        return y_pad[:, :, _PAD:-_PAD, _PAD:-_PAD], symbols, scales_all, means_all

    def _raster_encode(
        self, y: Tensor, params: Tensor, a: Tensor
    ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        def round_here(scales: Tensor, means: Tensor, i: int, j: int) -> Tensor:
            return _symbols(y[:, :, i : i + 1, j : j + 1], a, means)

        return self._raster(params, a, round_here)

    def _context_encode(
        self, y: Tensor, params: Tensor, a: Tensor
    ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """ŷ, symbols, scales and means of the context model in the current coding order: the
        encoder, the test-mode forward pass and the decoder all walk the same way."""
        if self.coding_order == "wavefront":
            return self._walk_round(y, params, a)
        return self._raster_encode(y, params, a)

    # ---- the contract -------------------------------------------------------------------------
    def _forward_padded(self, x: Tensor) -> CodecOutput:
        net = self.net
        a = self.current_gain().to(x.device)
        a_d = a.detach()  # the de-scaling never trains the gain (QVRF)
        y = net.g_a(x)
        z = self._hyper(y)
        z_hat, z_likelihoods = net.entropy_bottleneck(z)
        if self.training and self.quantizer == "ste":
            medians = net.entropy_bottleneck._get_medians().reshape(1, -1, 1, 1)
            z_hat = quantize_ste(z - medians) + medians
        params = net.h_s(z_hat)

        if not self.training:
            if self.autoregressive:
                y_hat, q, scales, _ = self._context_encode(y, params, a)
            else:
                scales, means = self._split(params)
                q = _symbols(y, a, means)
                y_hat = _dequantize(q, a, means)
            y_bits = self._y_bits(q, scales, a)
        elif self.quantizer == "noise":
            noisy = a * y + torch.empty_like(y).uniform_(-0.5, 0.5)
            y_hat = noisy / a_d
            if self.autoregressive:
                scales, means = self._context_params(params, y_hat)
            else:
                scales, means = self._split(params)
            y_bits = self._y_bits(noisy if means is None else noisy - a * means, scales, a)
        else:  # straight-through: the decoder sees rounded latents, the rate keeps its noise
            if self.autoregressive:  # the means the encoder would use, from its walk
                means_sg = self._context_encode(y.detach(), params.detach(), a_d)[3]
            else:
                means_sg = self._split(params)[1]
                means_sg = None if means_sg is None else means_sg.detach()
            q = quantize_ste(a * (y if means_sg is None else y - means_sg))
            y_hat = _dequantize(q, a_d, means_sg)
            if self.autoregressive:
                scales, means = self._context_params(params, y_hat)
            else:
                scales, means = self._split(params)
            centred = y if means is None else y - means
            noisy = a * centred + torch.empty_like(y).uniform_(-0.5, 0.5)
            y_bits = self._y_bits(noisy, scales, a)
        x_hat = net.g_s(y_hat)
        bits = {"y": y_bits, "z": bits_from_likelihoods(z_likelihoods)}
        return CodecOutput(x_hat=x_hat, bits=bits)

    def _compress_padded(self, x: Tensor) -> tuple[list[bytes], tuple[int, ...]]:
        net = self.net
        a = self.current_gain().to(x.device)
        y = net.g_a(x)
        z = self._hyper(y)
        z_strings = net.entropy_bottleneck.compress(z)
        z_hat = net.entropy_bottleneck.decompress(z_strings, z.shape[-2:])
        params = net.h_s(z_hat)
        conditional = net.gaussian_conditional
        if self.autoregressive and self.coding_order == "wavefront":
            _, q, scales, _ = self._walk_round(y, params, a)
            y_string = self._walk_stream(q, scales, a)
        elif self.autoregressive:
            _, q, scales, _ = self._raster_encode(y, params, a)
            indexes = conditional.build_indexes(a * scales)
            y_string = RansEncoder().encode_with_indexes(
                _raster_order(q), _raster_order(indexes), *self._tables()
            )
        else:
            scales, means = self._split(params)
            q = _symbols(y, a, means)
            y_string = conditional.compress(q, conditional.build_indexes(a * scales))[0]
        return [y_string, z_strings[0]], tuple(int(s) for s in z.shape[-2:])

    def _decompress_padded(self, streams: list[bytes], latent_shape: tuple[int, ...]) -> Tensor:
        if len(streams) != 2 or len(latent_shape) != 2:
            raise BitstreamError(
                f"{self.name} files hold 2 streams and a 2-d latent shape, got "
                f"{len(streams)} and {latent_shape}"
            )
        net = self.net
        a = self.current_gain().to(self.gain.device)
        z_hat = net.entropy_bottleneck.decompress([streams[1]], torch.Size(latent_shape))
        params = net.h_s(z_hat)
        conditional = net.gaussian_conditional
        if self.autoregressive and self.coding_order == "wavefront":
            y_hat = self._walk_read(streams[0], params, a)
        elif self.autoregressive:
            decoder = RansDecoder()
            decoder.set_stream(streams[0])
            tables = self._tables()

            def read_here(scales: Tensor, means: Tensor, i: int, j: int) -> Tensor:
                indexes = conditional.build_indexes(a * scales).reshape(-1).tolist()
                values = decoder.decode_stream(indexes, *tables)
                return torch.tensor(values, dtype=scales.dtype, device=scales.device).reshape(
                    scales.shape
                )

            y_hat = self._raster(params, a, read_here)[0]
        else:
            scales, means = self._split(params)
            q = conditional.decompress([streams[0]], conditional.build_indexes(a * scales))
            y_hat = _dequantize(q.to(params.dtype), a, means)
        return net.g_s(y_hat)


def _raster_order(t: Tensor) -> list[int]:
    """The symbols (1, C, H, W) of one image in the order the raster walk visits them."""
    return t[0].permute(1, 2, 0).reshape(-1).int().tolist()


# ---- the authors' released weights ---------------------------------------------------------------
# Their two model definitions (bytedance/QRAF): Cheng 2020 attention and Ballé's scale hyperprior,
# each CompressAI's network plus a `Gain` vector; our names add `net.` and call it `gain`.
_RELEASE_ARCHS = {"g_a.0.conv1.weight": "cheng2020-attn", "g_a.1.beta": "bmshj2018-hyperprior"}
_RELEASE_RULES = [(r"^Gain$", "gain"), (r"^(?!gain$)", "net.")]


def release_arch(state: dict[str, Tensor]) -> str:
    """Which of the authors' two models a state dict holds, from its first layers."""
    for key, arch in _RELEASE_ARCHS.items():
        if key in state:
            return arch
    raise CheckpointError(
        "not one of the QVRF authors' models (neither Cheng 2020 attention nor the scale "
        "hyperprior); say which CompressAI backbone it uses with --arch"
    )


def release_lmbda_set(gains: Tensor) -> str:
    """The named λ set of a release, from its number of gains (8 or 11)."""
    by_count = {len(v): name for name, v in LMBDA_SETS.items()}
    if gains.dim() != 1 or len(gains) not in by_count:
        raise CheckpointError(
            f"QVRF Gain of shape {tuple(gains.shape)}: the released models have "
            f"{' or '.join(str(n) for n in sorted(by_count))} gains"
        )
    return by_count[len(gains)]


@register_format(
    "qvrf",
    published_at="the QVRF authors' README (github.com/bytedance/QRAF: Cheng2020VR.pth.tar, and "
    "a second checkpoint for the 11-λ set)",
    help="QVRF's released variable-rate models (bytedance/QRAF; also its train.py checkpoints)",
)
def import_qvrf(request: ImportRequest) -> QvrfCodec:
    """The authors' Cheng2020VR (or a scale-hyperprior QVRF, or a checkpoint of their train.py)
    as our `QvrfCodec`: anchor index 0 with gain 1, the learnt gains as released."""
    state = read_torch_file(request.source, "a QVRF state dict")
    if isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]  # their train.py's checkpoint_best_loss.pth.tar
    state = compressai_state(state)
    if "Gain" not in state:
        raise CheckpointError(
            f"{request.source} has no Gain vector: not a QVRF model (a fixed-rate CompressAI "
            "file imports with `lic import compressai`)"
        )
    arch = (request.arch or release_arch(state)).replace("_", "-")
    if arch not in BACKBONES:
        raise CheckpointError(f"--arch {arch}: QVRF backbones are {', '.join(BACKBONES)}")
    try:
        n, m = zoo_widths(arch, state)
        if arch.startswith("cheng2020") and state["context_prediction.weight"].shape[1] != n:
            raise CheckpointError(
                f"{request.source} has N={n}, M={state['context_prediction.weight'].shape[1]}; "
                "CompressAI's Cheng 2020 (ours) has M = N"
            )
    except KeyError as err:
        raise CheckpointError(f"{request.source} is not a {arch} QVRF model (no {err})") from err
    paper = cfgs[arch][6]
    codec = QvrfCodec(
        arch,
        6,
        N=None if n == paper[0] else n,
        M=None if m is None or m == paper[1] else m,
        lmbda_set=release_lmbda_set(state["Gain"]),
    )
    fit_state(codec, rename_state(state, _RELEASE_RULES), str(request.source))
    return codec
