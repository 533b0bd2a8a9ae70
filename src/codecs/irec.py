"""iREC (Flamich, Havasi, Hernández-Lobato, NeurIPS 2020): VAEs whose latents are coded by
relative entropy coding instead of quantisation.

Two models share the coding machinery (`RecCodec`):

- `IrecLossy`: the two-level VAE in the style of Ballé 2018. Gaussian posteriors and priors at
  H/16 (N channels) and H/64 (M channels), GDN transforms, a learned constant feeding the top
  prior. Trained on β·255²·MSE + KL bits per pixel.
- `IrecLossless`: the bidirectional ResNet VAE (24 blocks at H/2, 32 latent channels each)
  with a discretized logistic pixel likelihood and one learned global scale. The pixels are coded
  for real with rANS under that likelihood after the latents, behind a CRC32 of the image.

`bits` in training is the analytic KL per latent group (plus the pixel NLL for the lossless
model); compression runs `src.coding.rec`, whose real cost is KL plus a few percent.
"""

from __future__ import annotations

import dataclasses
import math
import zlib
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from compressai.layers import GDN
from torch import Tensor, nn

from src.codecs.base import Codec, CodecOutput, Encoded, pad_to_multiple
from src.coding.categorical import CategoricalCoder
from src.coding.container import BitstreamError
from src.coding.rec import (
    RecCode,
    RecOptions,
    RelativeEntropyCoder,
    pack_stream,
    sample_check,
    stream_header_bytes,
    unpack_stream,
)
from src.errors import ConfigError, LicError

Gaussian = tuple[Tensor, Tensor]  # mean, standard deviation
# pick(group, posterior or None, prior) -> the latent sample the rest of the model sees
Pick = Callable[[int, Gaussian | None, Gaussian], Tensor]
LN2 = math.log(2)


def gaussian_kl(q: Gaussian, p: Gaussian) -> Tensor:
    """Elementwise KL[N(q) || N(p)] in nats."""
    (mq, sq), (mp, sp) = q, p
    return torch.log(sp / sq) + (sq * sq + (mq - mp) ** 2) / (2 * sp * sp) - 0.5


def _conv(cin: int, cout: int, k: int = 5, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(cin, cout, k, stride=stride, padding=k // 2)


def _deconv(cin: int, cout: int, k: int = 5) -> nn.ConvTranspose2d:
    return nn.ConvTranspose2d(cin, cout, k, stride=2, padding=k // 2, output_padding=1)


class RecCodec(Codec):
    """A VAE whose latent groups are coded one after another by relative entropy coding.

    Subclasses implement `_walk(x, latent_shape, pick)`: run the model from the top latent group
    to the output, asking `pick` for each group's sample. `x` is None when decoding (there is no
    posterior then). `_group_dims(latent_shape)` gives each group's size, so the decoder can read
    every group's code from the one stream (`src.coding.rec.pack_stream`) before walking.

    Args:
        coding: the preset's default coding options (`set_coding_options` keys); the decoder
            needs none of them.
    """

    num_groups: int = 1

    def __init__(self, coding: dict[str, Any] | None = None) -> None:
        super().__init__()
        self.rec_options = RecOptions()
        self._sample_in_eval = False
        self.set_coding_options(**dict(coding or {}))

    # One stream per image: REC settings, the check, every group's indices (and the pixels).
    num_streams = 1

    # ---- coding options ------------------------------------------------------------------------
    def set_coding_options(self, **options: Any) -> None:
        """n_beams, extra_samples (1 + ε), kl_per_partition (Ω nats), block_size, seed."""
        known = {f.name for f in dataclasses.fields(RecOptions)}
        unknown = sorted(set(options) - known)
        if unknown:
            raise LicError(
                f"{self.name} takes the coding options {sorted(known)}, not {', '.join(unknown)}"
            )
        try:
            self.rec_options = dataclasses.replace(self.rec_options, **options)
        except (TypeError, ValueError) as err:
            raise LicError(f"bad coding option for {self.name}: {err}") from err

    # ---- the three passes ------------------------------------------------------------------------
    def _walk(
        self, x: Tensor | None, latent_shape: tuple[int, ...], pick: Pick, output: bool = True
    ) -> Tensor:
        """With `output` False the walk may stop after the last latent group (and return it)."""
        raise NotImplementedError

    def _latent_shape(self, x: Tensor) -> tuple[int, ...]:
        raise NotImplementedError

    def _group_dims(self, latent_shape: tuple[int, ...]) -> list[int]:
        raise NotImplementedError

    def forward_sampled(self, x: Tensor) -> CodecOutput:
        """The forward pass with posterior samples in eval mode too: the figures of what REC
        codes (a posterior sample), which the paper reports, instead of the posterior mean."""
        self._sample_in_eval = True
        try:
            return self(x)
        finally:
            self._sample_in_eval = False

    def _training_pick(self, kls: list[Tensor]) -> Pick:
        """A posterior sample in training (and in `forward_sampled`), the posterior mean in
        eval; records each group's KL."""

        def pick(group: int, q: Gaussian | None, p: Gaussian) -> Tensor:
            assert q is not None
            kls.append(gaussian_kl(q, p))
            if self.training or self._sample_in_eval:
                return q[0] + q[1] * torch.randn_like(q[0])
            return q[0]

        return pick

    def _kl_extras(self, kls: list[Tensor]) -> dict[str, Any]:
        """Each group's per-channel KL for free bits, which apply in training only."""
        return {"kl_nats_per_channel": _per_channel(kls)} if self.training else {}

    def _encode_latents(
        self, x: Tensor, output: bool = True
    ) -> tuple[RelativeEntropyCoder, list[RecCode], int, Tensor]:
        """REC-code every latent group of one image; returns the coder, the codes, the running
        CRC32 of the coded samples and `_walk`'s output."""
        coder = RelativeEntropyCoder(self.rec_options)
        codes: list[RecCode] = []
        check = 0

        def pick(group: int, q: Gaussian | None, p: Gaussian) -> Tensor:
            nonlocal check
            assert q is not None
            z, code = coder.encode(*_cpu(q), *_cpu(p), key=group)
            codes.append(code)
            check = sample_check(z, check)
            return z.to(p[0].device)

        out = self._walk(x, self._latent_shape(x), pick, output)
        return coder, codes, check, out

    def _read_stream(
        self, streams: list[bytes], latent_shape: tuple[int, ...]
    ) -> tuple[RelativeEntropyCoder, list[RecCode], int, bytes]:
        """The one stream's coder, codes, check and the bytes after the REC part."""
        self._check_shape(latent_shape)
        if len(streams) != 1:
            raise BitstreamError(f"{self.name} needs 1 stream, got {len(streams)}")
        return unpack_stream(streams[0], self._group_dims(latent_shape))

    def _decode_latents(
        self,
        coder: RelativeEntropyCoder,
        codes: list[RecCode],
        latent_shape: tuple[int, ...],
        x: Tensor | None = None,
    ) -> tuple[Tensor, list[Tensor], int]:
        """Regenerate every latent group; returns `_walk`'s output, each group's KL (with `x`)
        and the running CRC32 of the samples."""
        kls: list[Tensor] = []
        check = 0

        def pick(group: int, q: Gaussian | None, p: Gaussian) -> Tensor:
            nonlocal check
            z = coder.decode(*_cpu(p), codes[group], key=group)
            check = sample_check(z, check)
            if q is not None:
                kls.append(gaussian_kl(q, p))
            return z.to(p[0].device)

        return self._walk(x, latent_shape, pick), kls, check

    def _check_shape(self, latent_shape: tuple[int, ...]) -> None:
        if len(latent_shape) != 2 or min(latent_shape) < 1:
            raise BitstreamError(f"{self.name} expects a latent shape (h, w), got {latent_shape}")

    # ---- reporting -----------------------------------------------------------------------------
    @torch.no_grad()
    def coding_report(self, x: Tensor, encoded: Encoded) -> dict[str, float]:
        """KL of the coded samples, REC bits, their overhead over the KL, whole-file bits and
        bits per pixel with and without framing (container, settings, check)."""
        x_padded, _ = pad_to_multiple(
            x if x.dim() == 4 else x.unsqueeze(0), self.stride, self.min_side
        )
        coder, codes, _, rest = self._read_stream(encoded.streams, encoded.latent_shape)
        out, kls, _ = self._decode_latents(coder, codes, encoded.latent_shape, x_padded)
        kl_bits = float(sum(k.sum() for k in kls)) / LN2
        stream = encoded.streams[0]
        rec_bits = 8 * (len(stream) - len(rest))
        framing = 8 * (len(self.pack(encoded)) - len(stream) + stream_header_bytes(stream))
        pixels = encoded.image_size[0] * encoded.image_size[1]
        real_bits = 8 * len(self.pack(encoded))
        report = {
            "kl_bits": kl_bits,
            "rec_bits": float(rec_bits),
            "real_bits": float(real_bits),
            "framing_bits": float(framing),
            "bpp_unframed": (real_bits - framing) / pixels,
            "rec_overhead_percent": 100 * (rec_bits / kl_bits - 1) if kl_bits > 0 else math.nan,
        }
        report.update(self._extra_report(x_padded, out, encoded, rest, framing))
        return report

    def _extra_report(
        self, x: Tensor, out: Tensor, encoded: Encoded, rest: bytes, framing: int
    ) -> dict[str, float]:
        return {}


MISMATCH = (
    "decoded {what} does not match the coded one (corrupt file, wrong seed, other weights, or a "
    "prior that differs between the two machines)"
)


def _cpu(g: Gaussian) -> Gaussian:
    return g[0].detach().cpu(), g[1].detach().cpu()


# ==== the lossy two-level VAE ====================================================================
class IrecLossy(RecCodec):
    """Two-level Gaussian VAE (y at H/16 with N channels, z at H/64 with M channels).

    Args:
        N: channels of the transforms and of y (196 in the paper).
        M: channels of the hyper transforms and of z (128).
        combiner: how the level-1 posterior joins the inference and prior statistics:
            "pairs" (the reference: loc from [inference loc, prior loc], log-scale from
            [inference log-scale, prior log-scale], each ELU then a 1x1 conv from 2N) or
            "joint" (both heads see all four, 4N inputs; +2N² weights).
        coding: the default coding options (see `RecCodec`).
    """

    name = "irec-lossy"
    stride = 64
    num_groups = 2

    def __init__(
        self,
        N: int = 196,
        M: int = 128,
        combiner: str = "pairs",
        coding: dict[str, Any] | None = None,
    ) -> None:
        if combiner not in COMBINERS:
            raise ConfigError(f"model.codec.combiner must be one of {COMBINERS}, got {combiner!r}")
        super().__init__(coding)
        self._record_config(N=N, M=M, combiner=combiner, coding=dict(coding or {}))
        self.combiner = combiner
        self.analysis = nn.Sequential(
            _conv(3, N, stride=2),
            GDN(N),
            _conv(N, N, stride=2),
            GDN(N),
            _conv(N, N, stride=2),
            GDN(N),
        )
        self.y_inf_loc = _conv(N, N, stride=2)
        self.y_inf_log_scale = _conv(N, N, stride=2)
        self.hyper_analysis = nn.Sequential(
            _conv(N, M, k=3), nn.ReLU(), _conv(M, M, stride=2), nn.ReLU()
        )
        self.z_q_loc = nn.Conv2d(M, M, 5, stride=2, padding=2, bias=False)
        self.z_q_scale = nn.Conv2d(M, M, 5, stride=2, padding=2, bias=False)
        self.z_prior_const = nn.Parameter(torch.zeros(1, M, 1, 1))
        self.z_prior = nn.Sequential(_conv(M, M, k=3), nn.ELU())
        self.z_p_loc = _conv(M, M, k=3)
        self.z_p_scale = _conv(M, M, k=3)
        self.hyper_synthesis = nn.Sequential(_deconv(M, M), nn.ReLU(), _deconv(M, M), nn.ReLU())
        self.y_p_loc = _conv(M, N, k=3)
        self.y_p_scale = _conv(M, N, k=3)
        inputs = 2 * N if combiner == "pairs" else 4 * N
        self.y_q_loc = nn.Conv2d(inputs, N, 1)
        self.y_q_scale = nn.Conv2d(inputs, N, 1)
        self.synthesis = nn.Sequential(
            _deconv(N, N),
            GDN(N, inverse=True),
            _deconv(N, N),
            GDN(N, inverse=True),
            _deconv(N, N),
            GDN(N, inverse=True),
            _deconv(N, 3),
        )

    def _latent_shape(self, x: Tensor) -> tuple[int, ...]:
        return (x.shape[-2] // 64, x.shape[-1] // 64)

    def _group_dims(self, latent_shape: tuple[int, ...]) -> list[int]:
        h, w = latent_shape
        return [self.z_p_loc.out_channels * h * w, self.y_p_loc.out_channels * 16 * h * w]

    def _walk(
        self, x: Tensor | None, latent_shape: tuple[int, ...], pick: Pick, output: bool = True
    ) -> Tensor:
        self._check_shape(latent_shape)
        h, w = latent_shape
        q_z = inf = None
        if x is not None:
            feat = self.analysis(x)
            inf = (self.y_inf_loc(feat), self.y_inf_log_scale(feat))
            g = self.hyper_analysis(inf[0])
            q_z = (self.z_q_loc(g), F.softplus(self.z_q_scale(g)) + 1e-7)
        batch = 1 if x is None else x.shape[0]
        g = self.z_prior(self.z_prior_const.expand(batch, -1, h, w))
        p_z = (self.z_p_loc(g), F.softplus(self.z_p_scale(g)) + 1e-7)
        z = pick(0, q_z, p_z)
        g = self.hyper_synthesis(z)
        p_loc, p_log_scale = self.y_p_loc(g), self.y_p_scale(g)
        p_y = (p_loc, F.softplus(p_log_scale) + 1e-7)
        q_y = None
        if inf is not None:
            if self.combiner == "pairs":
                loc_in = F.elu(torch.cat([inf[0], p_loc], dim=1))
                scale_in = F.elu(torch.cat([inf[1], p_log_scale], dim=1))
            else:
                loc_in = scale_in = F.elu(torch.cat([inf[0], inf[1], p_y[0], p_y[1]], dim=1))
            q_y = (self.y_q_loc(loc_in), F.softplus(self.y_q_scale(scale_in)) + 1e-7)
        y = pick(1, q_y, p_y)
        return self.synthesis(y) if output else y

    def _forward_padded(self, x: Tensor) -> CodecOutput:
        kls: list[Tensor] = []
        x_hat = self._walk(x, self._latent_shape(x), self._training_pick(kls))
        kl_z, kl_y = kls
        bits = {"y": kl_y.flatten(1).sum(1) / LN2, "z": kl_z.flatten(1).sum(1) / LN2}
        return CodecOutput(x_hat, bits, self._kl_extras(kls))

    def _compress_padded(self, x: Tensor) -> tuple[list[bytes], tuple[int, ...]]:
        coder, codes, check, _ = self._encode_latents(x, output=False)  # no synthesis needed
        return [pack_stream(coder, codes, check)], self._latent_shape(x)

    def _extra_report(
        self, x: Tensor, out: Tensor, encoded: Encoded, rest: bytes, framing: int
    ) -> dict[str, float]:
        """The posterior mean's PSNR beside the coded sample's (evaluate.py's psnr)."""
        h, w = encoded.image_size
        x_hat = torch.round(self(x).x_hat.clamp(0, 1) * 255) / 255
        mse = float((x_hat - x)[..., :h, :w].pow(2).mean())
        return {"psnr_mean": 10 * math.log10(1 / mse) if mse > 0 else math.inf}

    def _decompress_padded(self, streams: list[bytes], latent_shape: tuple[int, ...]) -> Tensor:
        coder, codes, check, rest = self._read_stream(streams, latent_shape)
        if rest:
            raise BitstreamError(f"{self.name} stream is longer than its code")
        x_hat, _, decoded = self._decode_latents(coder, codes, latent_shape)
        if decoded != check:
            raise BitstreamError(MISMATCH.format(what="latent sample"))
        return x_hat


COMBINERS = ("pairs", "joint")


def _per_channel(kls: list[Tensor]) -> list[Tensor]:
    """Each group's KL summed over space: (B, C) nats, what free bits clamp."""
    return [k.flatten(2).sum(2) for k in kls]


# ==== the lossless ResNet VAE ====================================================================
class _ResBlock(nn.Module):
    """One bidirectional block: an inference step up, a generative step down with a latent.

    The last block of the inference pass has no residual convolutions up (`up_convs=False`):
    nothing reads its output, as in the reference.
    """

    def __init__(self, channels: int, z_channels: int, up_convs: bool = True) -> None:
        super().__init__()
        c, z = channels, z_channels
        self.q_loc, self.q_log_scale = _conv(c, z, k=3), _conv(c, z, k=3)
        if up_convs:
            self.up1, self.up2 = _conv(c, c, k=3), _conv(c, c, k=3)
        self.p_loc, self.p_log_scale = _conv(c, z, k=3), _conv(c, z, k=3)
        self.g_loc, self.g_log_scale = _conv(c, z, k=3), _conv(c, z, k=3)
        self.down1, self.down2 = _conv(c, c, k=3), _conv(c + z, c, k=3)

    def up(self, h: Tensor) -> tuple[Tensor, Gaussian]:
        a = F.elu(h)
        q = (self.q_loc(a), self.q_log_scale(a))
        if not hasattr(self, "up1"):
            return h, q
        return h + 0.1 * self.up2(F.elu(self.up1(a))), q

    def down(self, h: Tensor, q_inf: Gaussian | None, group: int, pick: Pick) -> Tensor:
        a = F.elu(h)
        p = (self.p_loc(a), _std(self.p_log_scale(a)))
        q = None
        if q_inf is not None:
            q = (q_inf[0] + self.g_loc(a), _std(q_inf[1] + self.g_log_scale(a)))
        z = pick(group, q, p)
        return h + 0.1 * self.down2(F.elu(torch.cat([self.down1(a), z], dim=1)))


def _std(log_scale: Tensor) -> Tensor:
    return torch.exp(log_scale.clamp(-10.0, 5.0))


MEAN_STEPS = 16  # the pixel coder's tables sit at means 0, 1/16, ..., 255


class IrecLossless(RecCodec):
    """Bidirectional ResNet VAE with a discretized logistic likelihood (lossless).

    Args:
        N: channels of the residual stream (160 in the paper).
        z_channels: latent channels per block (32).
        num_blocks: residual blocks, one latent group each (24).
        coding: the default coding options (see `RecCodec`).
    """

    name = "irec-lossless"
    stride = 2
    lossless = True

    def __init__(
        self,
        N: int = 160,
        z_channels: int = 32,
        num_blocks: int = 24,
        coding: dict[str, Any] | None = None,
    ) -> None:
        super().__init__(coding)
        self._record_config(
            N=N, z_channels=z_channels, num_blocks=num_blocks, coding=dict(coding or {})
        )
        self.num_groups = num_blocks
        self.stem = _conv(3, N, stride=2)
        self.blocks = nn.ModuleList(
            _ResBlock(N, z_channels, up_convs=i < num_blocks - 1) for i in range(num_blocks)
        )
        self.h_top = nn.Parameter(torch.zeros(1, N, 1, 1))
        self.head = nn.ConvTranspose2d(N, 3, 5, stride=2, padding=2, output_padding=1)
        self.log_scale = nn.Parameter(torch.zeros(1))
        self._tables: tuple[float, CategoricalCoder] | None = None

    def _latent_shape(self, x: Tensor) -> tuple[int, ...]:
        return (x.shape[-2] // 2, x.shape[-1] // 2)

    def _group_dims(self, latent_shape: tuple[int, ...]) -> list[int]:
        h, w = latent_shape
        return [self.blocks[0].p_loc.out_channels * h * w] * self.num_groups

    def _walk(
        self, x: Tensor | None, latent_shape: tuple[int, ...], pick: Pick, output: bool = True
    ) -> Tensor:
        """The mean of the pixel likelihood in [-0.5, 0.5] units (always: the pixels need it)."""
        self._check_shape(latent_shape)
        q_inf: list[Gaussian | None] = [None] * len(self.blocks)
        if x is not None:
            h = self.stem(_to_model_units(x))
            for i, block in enumerate(self.blocks):
                h, q_inf[i] = block.up(h)
        batch = 1 if x is None else x.shape[0]
        h = self.h_top.expand(batch, -1, *latent_shape)
        for i in reversed(range(len(self.blocks))):
            h = self.blocks[i].down(h, q_inf[i], len(self.blocks) - 1 - i, pick)
        mean = self.head(F.elu(h))
        return mean.clamp(-0.5 + 1 / 512, 0.5 - 1 / 512)

    def _forward_padded(self, x: Tensor) -> CodecOutput:
        kls: list[Tensor] = []
        mean = self._walk(x, self._latent_shape(x), self._training_pick(kls))
        nll = -self._log_likelihood(x, mean)
        bits = {
            "z": sum(k.flatten(1).sum(1) for k in kls) / LN2,
            "x": nll.flatten(1).sum(1) / LN2,
        }
        # A lossless codec reconstructs its input exactly: there is no distortion to train on.
        extras = {**self._kl_extras(kls), "mean": mean}
        return CodecOutput(x, bits, extras)

    def _log_likelihood(self, x: Tensor, mean: Tensor) -> Tensor:
        """log P(pixel) under the discretized logistic (bins of 1/256, edge bins open)."""
        v = _pixels(x)
        centre = (v + 0.5) / 256 - 0.5
        inv_s = torch.exp(-self.log_scale)
        upper = torch.sigmoid((centre + 1 / 512 - mean) * inv_s)
        lower = torch.sigmoid((centre - 1 / 512 - mean) * inv_s)
        upper = torch.where(v >= 255, torch.ones_like(upper), upper)
        lower = torch.where(v <= 0, torch.zeros_like(lower), lower)
        return torch.log((upper - lower).clamp_min(1e-12))

    # ---- pixel coding ---------------------------------------------------------------------------
    def _pixel_coder(self) -> CategoricalCoder:
        """Tables of the discretized logistic at every mean on a 1/16-pixel grid (cached)."""
        key = float(self.log_scale.detach())
        if self._tables is None or self._tables[0] != key:
            means = torch.arange(255 * MEAN_STEPS + 1, dtype=torch.float64) / MEAN_STEPS
            v = torch.arange(256, dtype=torch.float64)
            s = math.exp(key) * 256
            upper = torch.sigmoid((v + 1 - means[:, None] - 0.5) / s)
            lower = torch.sigmoid((v - means[:, None] - 0.5) / s)
            upper[:, -1], lower[:, 0] = 1.0, 0.0
            self._tables = (key, CategoricalCoder.from_probabilities(upper - lower))
        return self._tables[1]

    @staticmethod
    def _table_index(mean: Tensor) -> Tensor:
        """The table of each pixel: its mean in pixel units, rounded to the 1/16 grid."""
        m = (mean.double() + 0.5) * 256 - 0.5
        return torch.round(m * MEAN_STEPS).clamp(0, 255 * MEAN_STEPS).long()

    def _compress_padded(self, x: Tensor) -> tuple[list[bytes], tuple[int, ...]]:
        coder, codes, check, mean = self._encode_latents(x)
        pixels = _pixels(x).long().cpu()
        data = self._pixel_coder().encode(pixels, self._table_index(mean).cpu())
        stream = pack_stream(coder, codes, _pixel_check(pixels, check)) + data
        return [stream], self._latent_shape(x)

    def _decompress_padded(self, streams: list[bytes], latent_shape: tuple[int, ...]) -> Tensor:
        coder, codes, check, data = self._read_stream(streams, latent_shape)
        mean, _, decoded = self._decode_latents(coder, codes, latent_shape)
        pixels = self._pixel_coder().decode(data, self._table_index(mean).cpu())
        if _pixel_check(pixels, decoded) != check:
            raise BitstreamError(MISMATCH.format(what="image"))
        return pixels.to(mean.device, torch.float32) / 255

    def _extra_report(
        self, x: Tensor, out: Tensor, encoded: Encoded, rest: bytes, framing: int
    ) -> dict[str, float]:
        dims = 3 * encoded.image_size[0] * encoded.image_size[1]
        real_bits = 8 * len(self.pack(encoded))
        nll_bits = float(-self._log_likelihood(x, out).sum()) / LN2
        elbo_bits = float(self.forward_sampled(x).total_bits().sum())
        return {
            "nll_bits": nll_bits,
            "residual_bits": float(8 * len(rest)),
            "bits_per_dim": real_bits / dims,
            "bits_per_dim_unframed": (real_bits - framing) / dims,
            "elbo_bits_per_dim": elbo_bits / dims,
        }


def _pixel_check(pixels: Tensor, value: int = 0) -> int:
    """CRC32 of 8-bit pixels after the latents' (`value`): the file's one integrity check, the
    decoder's proof the image came back exactly."""
    return zlib.crc32(pixels.to(torch.uint8).contiguous().numpy().tobytes(), value)


def _pixels(x: Tensor) -> Tensor:
    """8-bit pixel values 0..255 (as floats) of an image in [0, 1]."""
    return torch.round(x.clamp(0, 1) * 255)


def _to_model_units(x: Tensor) -> Tensor:
    """Pixels as bin centres in [-0.5, 0.5], the reference model's input."""
    return (_pixels(x) + 0.5) / 256 - 0.5
