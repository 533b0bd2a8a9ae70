"""QRes-VAE: a quantisation-aware hierarchical VAE (Duan, Lu, Ma, Zhu; WACV 2023).

A ConvNeXt bottom-up encoder and a top-down decoder with 12 latent blocks from 1/64 to 1/4 of the
image size. Each latent has a unit-width uniform posterior around a predicted mean and a
Gaussian-convolved-with-uniform prior; at test time it is rounded relative to the prior mean and
coded with CompressAI's rANS under a table of discretised Gaussians. Coding runs coarse to fine,
one stream per latent block, so the first k streams already decode an image (the remaining
latents take their prior means). The lossless variant adds a discretised-Gaussian pixel model
whose stream is the last one and reconstructs 8-bit images exactly.

Rates are counted in bits here (the paper's nats per sub-pixel appear only in the training loss).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch
from compressai.entropy_models import GaussianConditional
from torch import Tensor, nn

from src.codecs.base import Codec, CodecOutput, Encoded
from src.codecs.compressai_zoo import bits_from_likelihoods
from src.codecs.importing import (
    ImportRequest,
    fit_state,
    read_torch_file,
    register_format,
    rename_state,
)
from src.codecs.qres_blocks import (
    ConvNeXtBlock,
    ConvNeXtDown,
    LatentBlock,
    deconv,
    discretized_gaussian_log_mass,
    patch_downsample,
    patch_upsample,
)
from src.coding.container import BitstreamError
from src.errors import CheckpointError, ConfigError, LicError

# The paper's base widths; widths are 2N at 1/4 resolution and 4N below.
PAPER_N = {"qres34m": 96, "qres17m": 72}
# Input normalisation x = (im + shift) * scale: ImageNet statistics (qres34m), CelebA (qres17m).
INPUT_NORM = {
    "qres34m": (-0.4546259594901961, 3.67572653978347),
    "qres17m": (-0.4356, 3.397893306150187),
}
# Coding tables: latents use 64 log-spaced scales in [0.1, 20], pixels 128 in [0.11, 20] levels.
LATENT_SCALES = torch.exp(torch.linspace(math.log(0.1), math.log(20.0), 64)).tolist()
PIXEL_SCALES = torch.exp(torch.linspace(math.log(0.11), math.log(20.0), 128)).tolist()
PIXEL_LOGSCALE_FLOOR = 16.0  # softplus(l + 16) - 16: practically unbounded, as the reference
PIXEL_LEVELS = 255.0
# choose_z(i, block, feature, prior mean, prior scale) -> latent i (see QResVAE.top_down)
ChooseZ = Callable[[int, LatentBlock, Tensor, Tensor, Tensor], Tensor]


def _layout_qres34m(n: int) -> tuple[list[nn.Module], list[nn.Module]]:
    """Encoder and decoder of qres34m: 5 resolutions, latent blocks [1, 2, 3, 3, 3]."""
    w1, w2 = 2 * n, 4 * n
    encoder = [
        patch_downsample(3, w1, 4),
        *[ConvNeXtBlock(w1, 7) for _ in range(6)],  # 1/4
        ConvNeXtDown(w1, w2),
        *[ConvNeXtBlock(w2, 7) for _ in range(6)],  # 1/8
        ConvNeXtDown(w2, w2),
        *[ConvNeXtBlock(w2, 5) for _ in range(6)],  # 1/16
        ConvNeXtDown(w2, w2),
        *[ConvNeXtBlock(w2, 3) for _ in range(4)],  # 1/32
        ConvNeXtDown(w2, w2),
        *[ConvNeXtBlock(w2, 1) for _ in range(2)],  # 1/64
    ]
    decoder = [
        LatentBlock(w2, 16, 1),  # 1/64
        patch_upsample(w2, w2, 2),
        *[LatentBlock(w2, 14, 3) for _ in range(2)],  # 1/32
        patch_upsample(w2, w2, 2),
        *[LatentBlock(w2, 12, 5) for _ in range(3)],  # 1/16
        patch_upsample(w2, w2, 2),
        *[LatentBlock(w2, 10, 7) for _ in range(3)],  # 1/8
        patch_upsample(w2, w1, 2),
        *[LatentBlock(w1, 8, 7) for _ in range(3)],  # 1/4
    ]
    return encoder, decoder


def _layout_qres17m(n: int) -> tuple[list[nn.Module], list[nn.Module]]:
    """Encoder and decoder of qres17m: 4 resolutions (1/64, 1/16, 1/8, 1/4), blocks [1, 2, 4, 5]."""
    w1, w2 = 2 * n, 4 * n
    encoder = [
        patch_downsample(3, w1, 4),
        *[ConvNeXtBlock(w1, 7) for _ in range(6)],  # 1/4
        ConvNeXtDown(w1, w2),
        *[ConvNeXtBlock(w2, 5) for _ in range(6)],  # 1/8
        ConvNeXtDown(w2, w2),
        *[ConvNeXtBlock(w2, 3) for _ in range(4)],  # 1/16
        ConvNeXtDown(w2, w2, rate=4),
        *[ConvNeXtBlock(w2, 1) for _ in range(2)],  # 1/64
    ]
    decoder = [
        LatentBlock(w2, 16, 1),  # 1/64
        nn.Upsample(scale_factor=4),
        *[LatentBlock(w2, 8, 3) for _ in range(2)],  # 1/16
        deconv(w2, w2, 3),
        *[LatentBlock(w2, 6, 5) for _ in range(4)],  # 1/8
        deconv(w2, w1, 5),
        *[LatentBlock(w1, 4, 7) for _ in range(5)],  # 1/4
    ]
    return encoder, decoder


LAYOUTS = {"qres34m": _layout_qres34m, "qres17m": _layout_qres17m}


def box_slices(box: Sequence[float], h: int, w: int) -> tuple[slice, slice]:
    """Rows and columns of a (x1, y1, x2, y2) box given in fractions of the image, at h x w."""
    x1, y1, x2, y2 = box
    return slice(round(y1 * h), round(y2 * h)), slice(round(x1 * w), round(x2 * w))


class QResVAE(Codec):
    """QRes-VAE behind the codec contract.

    Args:
        arch: "qres34m" (34.0 M parameters, natural images) or "qres17m" (the CelebA model).
        N: base width (null: the paper's 96 / 72); small values make test-size models.
        lossless: replace the reconstruction head by a discretised-Gaussian pixel model and code
            the pixels too (the paper's qres34m_lossless).
    """

    stride = 64
    progressive = True

    def __init__(self, arch: str = "qres34m", N: int | None = None, lossless: bool = False):
        super().__init__()
        if arch not in LAYOUTS:
            raise ConfigError(f"model.codec.arch must be one of {tuple(LAYOUTS)}, got {arch!r}")
        n = PAPER_N[arch] if N is None else int(N)
        if n < 4 or n % 2:  # below 4 a bottleneck of the 1/4-resolution blocks has no channels
            raise ConfigError(f"model.codec.N must be an even width of at least 4, got {N}")
        self._record_config(arch=arch, N=N, lossless=lossless)
        self.name = f"{arch}_lossless" if lossless else arch
        self.lossless = lossless
        self.im_shift, self.im_scale = INPUT_NORM[arch]
        encoder, decoder = LAYOUTS[arch](n)
        self.encoder = nn.ModuleList(encoder)
        self.decoder = nn.ModuleList(decoder)
        self.latent_blocks = [b for b in self.decoder if isinstance(b, LatentBlock)]
        for block in self.latent_blocks:
            block.scale_residual(len(self.latent_blocks))
        top_width = self.latent_blocks[0].front.conv_dw.in_channels
        self.bias = nn.Parameter(torch.zeros(1, top_width, 1, 1))
        out_width = self.latent_blocks[-1].front.conv_dw.in_channels
        self.out_mean = patch_upsample(out_width, 3, 4)
        self.out_logscale = patch_upsample(out_width, 3, 4) if lossless else None
        self.latent_coder = GaussianConditional(LATENT_SCALES)
        self.pixel_coder = GaussianConditional(PIXEL_SCALES) if lossless else None

    # ---- structure ----------------------------------------------------------------------------
    @property
    def num_streams(self) -> int:
        """One stream per rate group; a progressive file may hold only the first ones."""
        return len(self.group_names)

    @property
    def group_names(self) -> list[str]:
        """The rate groups, in coding order: z1 (coarsest) ... zL, then `pixels` if lossless."""
        names = [f"z{i + 1}" for i in range(len(self.latent_blocks))]
        return names + (["pixels"] if self.lossless else [])

    def encode_features(self, x: Tensor) -> dict[int, Tensor]:
        """Bottom-up pass over an image in [0, 1]: the last encoder feature at each height."""
        feature = (x + self.im_shift) * self.im_scale
        features = {}
        for block in self.encoder:
            feature = block(feature)
            features[int(feature.shape[2])] = feature
        return features

    @staticmethod
    def _posterior_mean(block: LatentBlock, feature: Tensor, features: dict[int, Tensor]) -> Tensor:
        """The posterior mean of `block`'s latent: its decoder feature with the encoder's at the
        same height (from `encode_features`)."""
        return block.posterior_mean(feature, features[int(feature.shape[2])])

    def top_down(self, batch: int, size: tuple[int, int], choose_z: ChooseZ) -> Tensor:
        """Run the decoder from its learned bias at `size` (1/64 of the image); `choose_z(i,
        block, feature, pm, scale)` supplies latent i given its prior. Returns the last feature."""
        feature = self.bias.expand(batch, -1, *size)
        i = 0
        for block in self.decoder:
            if isinstance(block, LatentBlock):
                feature, pm, scale = block.prior(feature)
                feature = block.merge(feature, choose_z(i, block, feature, pm, scale))
                i += 1
            else:
                feature = block(feature)
        return feature

    def pixel_mean(self, feature: Tensor) -> Tensor:
        """The decoder's image (the reconstruction, or the pixel model's mean) in [0, 1]."""
        return self.out_mean(feature) * 0.5 + 0.5

    def _pixel_model(self, feature: Tensor) -> tuple[Tensor, Tensor]:
        """Mean and scale of the lossless pixel model, in 8-bit levels (bin width 1)."""
        mean = self.pixel_mean(feature) * PIXEL_LEVELS
        logscale = self.out_logscale(feature)
        logscale = nn.functional.softplus(logscale + PIXEL_LOGSCALE_FLOOR) - PIXEL_LOGSCALE_FLOOR
        # exp(l) in [-1, 1] units is exp(l) * 127.5 levels.
        return mean, torch.exp(logscale) * (PIXEL_LEVELS / 2)

    def _pixel_coding_params(self, feature: Tensor) -> tuple[Tensor, Tensor]:
        """The integer mean (8-bit levels) and the scale the pixel coder uses on both sides.

        Computed in the reference's float order, from the raw log-scale (its coder has no soft
        floor), so that the pixel stream is byte-identical to the authors' code."""
        half = PIXEL_LEVELS / 2
        mean = torch.round(self.out_mean(feature) * half + half)
        return mean, torch.exp(self.out_logscale(feature) - math.log(1 / half))

    # ---- the contract -------------------------------------------------------------------------
    def _forward_padded(self, x: Tensor) -> CodecOutput:
        b, _, h, w = x.shape
        features = self.encode_features(x)
        bits: dict[str, Tensor] = {}
        names = self.group_names

        def posterior_sample(i, block, feature, pm, scale):
            qm = self._posterior_mean(block, feature, features)
            if self.training:  # additive uniform noise; rate -log2 P(z) of the convolved prior
                z = qm + torch.empty_like(qm).uniform_(-0.5, 0.5)
                log_p = discretized_gaussian_log_mass(z, pm, scale)
                bits[names[i]] = -log_p.flatten(1).sum(1) / math.log(2)
            else:  # rounding relative to the prior mean, exactly as coded
                z, likelihood = self.latent_coder(qm, scale, means=pm, training=False)
                bits[names[i]] = bits_from_likelihoods(likelihood)
            return z

        feature = self.top_down(b, (h // self.stride, w // self.stride), posterior_sample)
        x_hat = self.pixel_mean(feature)
        if self.lossless:
            levels = (x * PIXEL_LEVELS).round()
            if self.training:
                mean, scale = self._pixel_model(feature)
                log_p = discretized_gaussian_log_mass(levels, mean, scale)
                bits["pixels"] = -log_p.flatten(1).sum(1) / math.log(2)
            else:  # the integer mean and the scale the pixel coder uses; decoding is exact
                mean, scale = self._pixel_coding_params(feature)
                likelihood = self.pixel_coder._likelihood(levels, scale, mean)
                bits["pixels"] = bits_from_likelihoods(
                    self.pixel_coder.likelihood_lower_bound(likelihood)
                )
                x_hat = levels / PIXEL_LEVELS
        return CodecOutput(x_hat=x_hat, bits=bits)

    def _compress_padded(self, x: Tensor) -> tuple[list[bytes], tuple[int, ...]]:
        features = self.encode_features(x)
        streams: list[bytes] = []
        coder = self.latent_coder

        def encode(i, block, feature, pm, scale):
            qm = self._posterior_mean(block, feature, features)
            streams.append(coder.compress(qm, coder.build_indexes(scale), means=pm)[0])
            return coder.quantize(qm, "dequantize", pm)

        h, w = x.shape[-2] // self.stride, x.shape[-1] // self.stride
        feature = self.top_down(1, (h, w), encode)
        if self.lossless:
            mean, scale = self._pixel_coding_params(feature)
            indexes = self.pixel_coder.build_indexes(scale)
            levels = (x * PIXEL_LEVELS).round()
            streams.append(self.pixel_coder.compress(levels, indexes, means=mean)[0])
        return streams, (h, w)

    def _decompress_padded(
        self, streams: list[bytes], latent_shape: tuple[int, ...], levels: int | None = None
    ) -> Tensor:
        """Decode a file holding the first k groups (1 <= k <= L, the pixels last for the
        lossless model) from its first `levels` of them (None: all k)."""
        groups = len(self.group_names)
        if not 1 <= len(streams) <= groups or len(latent_shape) != 2:
            raise BitstreamError(
                f"{self.name} files hold 1..{groups} streams (the first groups, coarse to fine) "
                f"and a 2-integer latent shape, got {len(streams)} streams and "
                f"{tuple(latent_shape)}"
            )
        k = len(streams) if levels is None else int(levels)
        if not 0 <= k <= len(streams):
            raise LicError(
                f"this {self.name} file holds {len(streams)} of {groups} coded groups; "
                f"levels must be in 0..{len(streams)}, got {k}"
            )
        coder = self.latent_coder

        def decode(i, block, feature, pm, scale):
            if i >= k:  # not transmitted (yet): the prior mean stands in
                return pm
            return coder.decompress([streams[i]], coder.build_indexes(scale), means=pm)

        feature = self.top_down(1, tuple(latent_shape), decode)
        if self.lossless and k == groups:  # every latent and the pixels: exact
            mean, scale = self._pixel_coding_params(feature)
            indexes = self.pixel_coder.build_indexes(scale)
            levels_ = self.pixel_coder.decompress([streams[-1]], indexes, means=mean)
            return levels_ / PIXEL_LEVELS
        return self.pixel_mean(feature)

    def prepare_for_coding(self) -> None:
        self.latent_coder.update_scale_table(LATENT_SCALES, force=True)
        if self.pixel_coder is not None:
            self.pixel_coder.update_scale_table(PIXEL_SCALES, force=True)

    def coding_report(self, x: Tensor, encoded: Encoded) -> dict[str, float]:
        """Bits per sub-pixel of the whole file; for the lossless model, whether it was exact."""
        h, w = encoded.image_size
        report = {"bits_per_dim": 8 * len(self.pack(encoded)) / (3 * h * w)}
        if self.lossless:
            x_hat = self.decompress(encoded)
            report["exact"] = float(torch.equal((x * PIXEL_LEVELS).round(), x_hat * PIXEL_LEVELS))
        return report

    # ---- generative uses ----------------------------------------------------------------------
    @torch.no_grad()
    def latents(self, x: Tensor) -> list[Tensor]:
        """The quantised latents z1..zL of images (B, 3, H, W) in [0, 1], H and W multiples of 64."""
        self._check_size(x.shape[-2:])
        features = self.encode_features(x)
        found: list[Tensor] = []

        def keep(i, block, feature, pm, scale):
            qm = self._posterior_mean(block, feature, features)
            found.append(self.latent_coder.quantize(qm, "dequantize", pm))
            return found[-1]

        self.top_down(x.shape[0], (x.shape[-2] // 64, x.shape[-1] // 64), keep)
        return found

    @torch.no_grad()
    def generate(
        self,
        batch: int,
        size: tuple[int, int],
        latents: Sequence[Tensor | None] | None = None,
        temperature: float = 1.0,
        box: Sequence[float] | None = None,
    ) -> Tensor:
        """Decode images (B, 3, H, W) in [0, 1] from given latents, sampling the missing ones.

        A latent that is None (or beyond `latents`) is drawn from its prior at `temperature`:
        z = pm + t·σ·ε + t·u, u ~ U(-½, ½) (t = 0 gives the prior mean). With `box` (x1, y1, x2,
        y2 in fractions of the image) only that region of every given latent is redrawn
        (inpainting); latents with a side of 1 are kept whole, as the reference keeps them.
        Every latent's prior sample is drawn either way, so the random stream does not depend
        on which latents are given.
        """
        self._check_size(size)
        latents = list(latents or [])

        def pick(i, block, feature, pm, scale):
            sampled = pm + temperature * (
                scale * torch.randn_like(pm) + torch.empty_like(pm).uniform_(-0.5, 0.5)
            )
            given = latents[i] if i < len(latents) else None
            if given is None:
                return sampled
            if box is None or min(given.shape[-2:]) == 1:  # a 1x1 latent holds no region
                return given
            rows, cols = box_slices(box, *given.shape[-2:])
            z = given.clone()
            z[..., rows, cols] = sampled[..., rows, cols]
            return z

        feature = self.top_down(batch, (size[0] // 64, size[1] // 64), pick)
        x = self.pixel_mean(feature)
        if self.lossless and temperature > 0:
            _, scale = self._pixel_model(feature)
            x = x + temperature * scale / PIXEL_LEVELS * torch.randn_like(x)
        return x.clamp(0, 1)

    def _check_size(self, size: Sequence[int]) -> None:
        if any(int(s) % self.stride or int(s) <= 0 for s in size):
            raise LicError(
                f"{self.name} generates and reads latents at sizes that are multiples of "
                f"{self.stride}, got {tuple(int(s) for s in size)}"
            )


# ---- the authors' released weights (lossy-vae, package lvae) ----------------------------------
# Released files by name: qres34m-lmb{16..2048}.pt, qres17m-lmb{1..64}.pt, qres34m-lossless.pt.
LVAE_ARCHS = ("qres34m", "qres17m", "qres34m_lossless")
# Their encoders have 29 (qres34m) and 22 (qres17m) blocks: the file itself says which it holds.
LVAE_ENCODER_LENGTHS = {29: "qres34m", 22: "qres17m"}
# The reference's per-block coding tables and its output head's: rebuilt by prepare_for_coding.
LVAE_DROP = (r"decoder\.dec_blocks\.\d+\.discrete_gaussian\..*", r"out_net\.discrete_gaussian\..*")


def lvae_rules(codec: QResVAE) -> list[tuple[str, str]]:
    """Rename rules from the reference's keys to `codec`'s: block lists, the ConvNeXt MLP, the
    VDVAE bottlenecks' c1..c4, the latent blocks' front/end, and the output head."""
    rules = []
    for i, block in enumerate(codec.encoder):
        if isinstance(block, ConvNeXtDown):  # one module there: the block and its downsampling
            rules += [
                (rf"^encoder\.enc_blocks\.{i}\.downsapmle\.", f"encoder.{i}.down."),
                (rf"^encoder\.enc_blocks\.{i}\.", f"encoder.{i}.block."),
            ]
    if not codec.lossless:  # the reference's last decoder block is the reconstruction head
        rules.append((rf"^decoder\.dec_blocks\.{len(codec.decoder)}\.", "out_mean."))
    rules += [
        (r"^encoder\.enc_blocks\.", "encoder."),
        (r"^decoder\.dec_blocks\.", "decoder."),
        (r"^decoder\.bias$", "bias"),
        (r"^out_net\.conv_mean\.", "out_mean."),
        (r"^out_net\.conv_scale\.", "out_logscale."),
        (r"\.mlp\.(fc\d)\.", r".\1."),
        (r"\.resnet_front\.", ".front."),
        (r"\.resnet_end\.", ".end."),
    ]
    for j in range(4):  # VDVAE bottlenecks: c1..c4 are our convs.0..3
        rules += [
            (rf"\.prior\.c{j + 1}\.", f".prior_head.convs.{j}."),
            (rf"\.posterior\.c{j + 1}\.", f".posterior.convs.{j}."),
        ]
    return rules


def lvae_state(codec: QResVAE, state: dict) -> dict:
    """The reference's state dict (or key -> shape list) under `codec`'s names, with `codec`'s
    own coding tables (the reference builds identical ones per block at coding time)."""
    renamed = rename_state(state, lvae_rules(codec), drop=LVAE_DROP)
    codec.prepare_for_coding()
    own_tables = {
        k: v
        for k, v in codec.state_dict().items()
        if k.startswith(("latent_coder.", "pixel_coder."))
    }
    return {**renamed, **own_tables}


def describe_lvae_state(state: dict, arch: str | None) -> tuple[str, int | None, bool]:
    """(arch, N, lossless) of a reference state dict, read off its layers; a given `arch`
    (qres34m, qres17m, qres34m_lossless) must agree with them."""
    try:
        n = int(state["encoder.enc_blocks.0.weight"].shape[0]) // 2
    except (KeyError, AttributeError, IndexError) as err:
        raise CheckpointError(f"not a QRes-VAE state dict of lvae (no {err})") from err
    length = len({k.split(".")[2] for k in state if k.startswith("encoder.enc_blocks.")})
    found = LVAE_ENCODER_LENGTHS.get(length)
    if found is None:
        raise CheckpointError(f"an lvae encoder of {length} blocks is neither qres34m nor qres17m")
    lossless = "out_net.conv_scale.0.weight" in state
    name = f"{found}_lossless" if lossless else found
    if arch is not None and arch != name:
        raise CheckpointError(f"the file holds a {name} model, not {arch}")
    return found, (None if n == PAPER_N[found] else n), lossless


@register_format(
    "lvae",
    published_at=(
        "the authors' Hugging Face page huggingface.co/duanzh0/my-model-weights, linked from "
        "github.com/duanzhiihao/lossy-vae (qres34m/qres34m-lmb16.pt ... lmb2048.pt, "
        "qres17m/qres17m-lmb1.pt ... lmb64.pt, qres34m/qres34m-lossless.pt)"
    ),
    help="QRes-VAE's released .pt files (qres34m, qres17m, qres34m_lossless)",
)
def import_lvae(request: ImportRequest) -> QResVAE:
    """A released QRes-VAE file as our `QResVAE`: every weight by renaming, none left over."""
    if request.arch is not None and request.arch not in LVAE_ARCHS:
        raise CheckpointError(f"--arch for lvae files is one of {LVAE_ARCHS}, not {request.arch}")
    loaded = read_torch_file(request.source, "an lvae checkpoint")
    state = loaded.get("model", loaded) if isinstance(loaded, dict) else None
    if not isinstance(state, dict):
        raise CheckpointError(f"{request.source} holds no state dict (lvae saves {{'model': ...}})")
    arch, n, lossless = describe_lvae_state(state, request.arch)
    codec = QResVAE(arch, N=n, lossless=lossless)
    fit_state(codec, lvae_state(codec, state), str(request.source))
    return codec
