"""McQuic: cascaded multi-codebook vector quantisation (Zhu et al., CVPR 2022).

The encoder maps the image to 1/8 resolution; L levels follow, each halving the resolution again
(1/16, 1/32, 1/64 for three levels). Level l splits its latent into m groups of N/m channels and
replaces each group by one of k_l codewords of its own sub-codebook; what the codewords miss is
passed down as the next level's input. The decoder restores the coarsest level first and adds
each finer level on top, so the coarse codes act as side information for the fine ones. There is
no hyperprior and no context model: the rate is fixed by m and the k_l, and the codes are
entropy-coded under one static categorical per (level, sub-codebook), the exponential moving
average of how often each codeword was chosen in training.

Training draws the codes with a hard (straight-through) Gumbel-softmax over logits
−‖x − c‖² / √k · s / T, where s is a learned per-sub-codebook scale and T the annealed temperature
(the recipe sets it every step; the Gumbel noise itself runs at √T). In eval mode every code is
the nearest codeword, so the forward pass reconstructs exactly what the decoder rebuilds.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from compressai.layers import GDN
from compressai.ops import LowerBound
from torch import Tensor, nn

from src.codecs.base import Codec, CodecOutput, Encoded, padded_size
from src.codecs.importing import (
    ImportRequest,
    fit_state,
    read_torch_file,
    register_format,
    rename_state,
    torch_hub_checkpoint_dirs,
)
from src.coding.categorical import CategoricalCoder, log2_probabilities, quantize_pmf
from src.coding.container import BitstreamError
from src.errors import CheckpointError, ConfigError, LicError

# ---- blocks -----------------------------------------------------------------------------------


PADDINGS = ("reflect", "zeros")
REASSIGN_SOURCES = ("random", "most_used")


def conv3x3(c_in: int, c_out: int, stride: int = 1, padding: str = "reflect") -> nn.Conv2d:
    """A 3×3 convolution padded by one pixel: by reflection as the released code, or zeros."""
    return nn.Conv2d(c_in, c_out, 3, stride=stride, padding=1, padding_mode=padding)


def subpixel_conv3x3(
    c_in: int, c_out: int, factor: int = 2, padding: str = "reflect"
) -> nn.Sequential:
    """A 3×3 convolution to factor² times the channels, then a pixel shuffle (upsampling)."""
    return nn.Sequential(conv3x3(c_in, c_out * factor**2, padding=padding), nn.PixelShuffle(factor))


class ResidualBlock(nn.Module):
    """x + conv(SiLU(conv(SiLU(x))))."""

    def __init__(self, channels: int, padding: str = "reflect") -> None:
        super().__init__()
        self.body = nn.Sequential(
            nn.SiLU(),
            conv3x3(channels, channels, padding=padding),
            nn.SiLU(),
            conv3x3(channels, channels, padding=padding),
        )

    def forward(self, x: Tensor) -> Tensor:
        return x + self.body(x)


class DownBlock(nn.Module):
    """Halves the resolution: SiLU, strided conv, GDN, conv, plus a strided-conv shortcut."""

    def __init__(self, channels: int, padding: str = "reflect") -> None:
        super().__init__()
        self.body = nn.Sequential(
            nn.SiLU(),
            conv3x3(channels, channels, stride=2, padding=padding),
            GDN(channels),
            conv3x3(channels, channels, padding=padding),
        )
        self.skip = conv3x3(channels, channels, stride=2, padding=padding)

    def forward(self, x: Tensor) -> Tensor:
        return self.skip(x) + self.body(x)


class UpBlock(nn.Module):
    """Doubles the resolution: SiLU, sub-pixel conv, inverse GDN, conv, plus a sub-pixel shortcut."""

    def __init__(self, channels: int, padding: str = "reflect") -> None:
        super().__init__()
        self.body = nn.Sequential(
            nn.SiLU(),
            subpixel_conv3x3(channels, channels, padding=padding),
            GDN(channels, inverse=True),
            conv3x3(channels, channels, padding=padding),
        )
        self.skip = subpixel_conv3x3(channels, channels, padding=padding)

    def forward(self, x: Tensor) -> Tensor:
        return self.skip(x) + self.body(x)


class AttentionBlock(nn.Module):
    """x + trunk(x) · sigmoid(mask(x)), trunk and mask three residual blocks each (Cheng 2020)."""

    def __init__(self, channels: int, padding: str = "reflect") -> None:
        super().__init__()
        self.trunk = nn.Sequential(*(ResidualBlock(channels, padding) for _ in range(3)))
        self.mask = nn.Sequential(
            *(ResidualBlock(channels, padding) for _ in range(3)), nn.Conv2d(channels, channels, 1)
        )

    def forward(self, x: Tensor) -> Tensor:
        return x + self.trunk(x) * torch.sigmoid(self.mask(x))


# ---- the quantiser ----------------------------------------------------------------------------


class MultiCodebookQuantizer(nn.Module):
    """m sub-codebooks of k codewords of dimension d; a (B, m·d, h, w) latent picks m codes per
    position.

    Buffers: `frequency` (m, k), the EMA of code usage (the coding prior; starts uniform), and
    `coding_table` (m, k), the integer frequencies frozen by `freeze_table()` for rANS (all zero
    until then).
    """

    def __init__(self, m: int, k: int, d: int, decay: float = 0.9) -> None:
        super().__init__()
        self.m, self.k, self.d = m, k, d
        self.decay = decay
        # "SmallInit" (Nguyen & Salazar 2019), as the released code initialises its codebooks.
        std = math.sqrt(2 / (5 * d))
        self.codebook = nn.Parameter(torch.randn(m, k, d) * std)
        self.logit_scale = nn.Parameter(torch.ones(m))
        self.scale_bound = LowerBound(1e-6)
        self.register_buffer("frequency", torch.full((m, k), 1.0 / k))
        self.register_buffer("coding_table", torch.zeros(m, k, dtype=torch.long))

    def logits(self, x: Tensor, temperature: float = 1.0) -> Tensor:
        """(B, m, h, w, k) logits −‖x − c‖² / √k · s / T; the codeword axis stays last."""
        b, _, h, w = x.shape
        x = x.reshape(b, self.m, self.d, h, w).permute(0, 1, 3, 4, 2)  # B, m, h, w, d
        cross = torch.einsum("bmhwd,mkd->bmhwk", x, self.codebook)
        x2 = x.pow(2).sum(-1, keepdim=True)
        c2 = self.codebook.pow(2).sum(-1)[None, :, None, None, :]
        distance = x2 + c2 - 2 * cross
        scale = self.scale_bound(self.logit_scale)[None, :, None, None, None]
        return -distance / math.sqrt(self.k) * scale / temperature

    def forward(
        self, x: Tensor, temperature: float = 1.0, stochastic: bool | None = None
    ) -> tuple[Tensor, Tensor, Tensor]:
        """Quantise x (B, m·d, h, w): (dequantised latent, codes (B, m, h, w), bits (B,)).

        Stochastic (training mode by default): a hard Gumbel-softmax sample (straight-through) at
        temperature √T, bits −Σ sample · log2 p differentiable through it, and the frequency EMA
        updated. Otherwise the nearest codewords, as coded.
        """
        stochastic = self.training if stochastic is None else stochastic
        logits = self.logits(x, temperature)
        codes = logits.argmax(-1)
        # The EMA is positive by construction: skip quantize_pmf's check (a sync every step).
        log2p = log2_probabilities(quantize_pmf(self.frequency, check=False))
        if stochastic:
            sample = F.gumbel_softmax(logits, tau=math.sqrt(temperature), hard=True)
            quantized = torch.einsum("bmhwk,mkd->bmdhw", sample, self.codebook)
            bits = -(sample * log2p[None, :, None, None, :]).sum(-1)
            self.update_frequency(codes)
            quantized = quantized.reshape(x.shape)
        else:
            quantized = self.decode(codes)
            bits = -log2p[torch.arange(self.m, device=x.device)[None, :, None, None], codes]
        return quantized, codes, bits.flatten(1).sum(1)

    def decode(self, codes: Tensor) -> Tensor:
        """Codewords of `codes` (B, m, h, w) as a latent (B, m·d, h, w)."""
        b, m, h, w = codes.shape
        groups = torch.arange(m, device=codes.device)[None, :, None, None]
        vectors = self.codebook[groups, codes]  # B, m, h, w, d
        return vectors.permute(0, 1, 4, 2, 3).reshape(b, m * self.d, h, w)

    @torch.no_grad()
    def update_frequency(self, codes: Tensor) -> None:
        """Fold this batch's code histogram into the EMA, summed over every DDP rank first."""
        counts = torch.zeros(self.m, self.k, device=codes.device)
        flat = codes.permute(1, 0, 2, 3).reshape(self.m, -1)
        counts.scatter_add_(1, flat, torch.ones_like(flat, dtype=counts.dtype))
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            dist.all_reduce(counts)
        batch = counts / counts.sum(-1, keepdim=True)
        self.frequency.mul_(self.decay).add_(batch.to(self.frequency.dtype), alpha=1 - self.decay)

    @torch.no_grad()
    def reassign(
        self, threshold: float, generator: torch.Generator | None = None, source: str = "random"
    ) -> int:
        """Re-seed codewords whose EMA frequency is below `threshold`; returns how many.

        At most k/2 per sub-codebook move at once (a random k/2 of the dead ones). `source`
        "random" (the official code) copies randomly drawn codewords exactly, drawn without
        replacement from the k − (moving) most frequent ones, where dead codewords left for a
        later round rank first, as they do there; "most_used" copies the most used codewords in
        turn, jittered by 1 % of the codebook's spread, so each copy splits its source's cell.
        """
        if source not in REASSIGN_SOURCES:
            raise ConfigError(
                f"reassignment source must be one of {REASSIGN_SOURCES}, not {source!r}"
            )
        moved = 0
        for group in range(self.m):
            freq = self.frequency[group].clone()
            dead = (freq < threshold).nonzero().flatten()
            if dead.numel() == 0 or dead.numel() == self.k:
                continue
            if dead.numel() > self.k // 2:
                order = torch.randperm(dead.numel(), generator=generator).to(dead.device)
                freq[dead[order[self.k // 2 :]]] = 1.0  # left for later, ranked first below
                dead = dead[order[: self.k // 2]]
            book = self.codebook.data[group]
            if source == "random":
                candidates = freq.argsort(descending=True)[: self.k - dead.numel()]
                pick = torch.randperm(candidates.numel(), generator=generator)[: dead.numel()]
                book[dead] = book[candidates[pick.to(candidates.device)]]
            else:
                alive = self.frequency[group] >= threshold
                live = self.frequency[group].argsort(descending=True)[: int(alive.sum())]
                sources = live[torch.arange(dead.numel(), device=live.device) % live.numel()]
                jitter = torch.randn(dead.numel(), self.d, generator=generator).to(book)
                book[dead] = book[sources] + 0.01 * book[live].std() * jitter
            moved += dead.numel()
        return moved

    def freeze_table(self) -> None:
        """Quantise the current EMA into the integer table that rANS codes with."""
        self.coding_table.copy_(quantize_pmf(self.frequency))

    def entropy_bits(self) -> Tensor:
        """Entropy in bits of each sub-codebook's frequency table (m,)."""
        p = self.frequency / self.frequency.sum(-1, keepdim=True)
        return -(p * torch.log2(p.clamp_min(1e-30))).sum(-1)


# ---- the codec --------------------------------------------------------------------------------


class McQuic(Codec):
    """The McQuic codec behind the framework's contract.

    Args:
        m: sub-codebooks per level (the released "qp"); N must be divisible by it.
        N: width of every block (the paper's `channel`: 128 for m=2, 192 for m=12).
        codebook_sizes: k_l of each level, finest first; one level per entry.
        frequency_decay: decay of the code-frequency EMA.
        padding: how every 3×3 convolution pads its border: "reflect" (the released code; images
            are then padded to 2^(4+L), so the coarsest level keeps two rows) or "zeros".
    """

    name = "mcquic"

    def __init__(
        self,
        m: int = 2,
        N: int = 128,
        codebook_sizes: Sequence[int] = (8192, 2048, 512),
        frequency_decay: float = 0.9,
        padding: str = "reflect",
    ) -> None:
        super().__init__()
        sizes = [int(k) for k in codebook_sizes]
        if m < 1 or N % m != 0:
            raise ConfigError(f"model.codec.N={N} must be a positive multiple of model.m={m}")
        if not sizes or min(sizes) < 2 or max(sizes) > 65536:
            raise ConfigError(f"codebook sizes must be in 2..65536, got {sizes}")
        if not 0 <= frequency_decay < 1:
            raise ConfigError(f"frequency_decay must be in [0, 1), got {frequency_decay}")
        if padding not in PADDINGS:
            raise ConfigError(f"model.codec.padding must be one of {PADDINGS}, got {padding!r}")
        self._record_config(
            m=m, N=N, codebook_sizes=sizes, frequency_decay=float(frequency_decay), padding=padding
        )
        self.m, self.N, self.codebook_sizes = m, N, sizes
        self.levels = len(sizes)
        # Reflection needs two rows at the coarsest level: pad images to 2× its stride then.
        self.stride = 2 ** (3 + self.levels + (padding == "reflect"))
        self.num_streams = self.levels  # one per level; the header holds the coarsest shape
        self.temperature = 1.0
        p = padding

        self.encoder = nn.Sequential(
            conv3x3(3, N, stride=2, padding=p),
            ResidualBlock(N, p),
            DownBlock(N, p),
            AttentionBlock(N, p),
            ResidualBlock(N, p),
            DownBlock(N, p),
            ResidualBlock(N, p),
        )
        self.decoder = nn.Sequential(
            ResidualBlock(N, p),
            UpBlock(N, p),
            AttentionBlock(N, p),
            ResidualBlock(N, p),
            UpBlock(N, p),
            ResidualBlock(N, p),
            subpixel_conv3x3(N, 3, padding=p),
        )

        last = self.levels - 1
        self.stage_encoders = nn.ModuleList(
            nn.Sequential(DownBlock(N, p), ResidualBlock(N, p), AttentionBlock(N, p)) for _ in sizes
        )
        self.quantization_heads = nn.ModuleList(
            nn.Sequential(ResidualBlock(N, p), AttentionBlock(N, p), conv3x3(N, N, padding=p))
            for _ in sizes
        )
        self.latent_heads = nn.ModuleList(
            nn.Sequential(ResidualBlock(N, p), AttentionBlock(N, p), conv3x3(N, N, padding=p))
            for _ in sizes[:last]
        )
        self.dequantization_heads = nn.ModuleList(
            nn.Sequential(AttentionBlock(N, p), conv3x3(N, N, padding=p), ResidualBlock(N, p))
            for _ in sizes
        )
        self.side_heads = nn.ModuleList(
            nn.Sequential(AttentionBlock(N, p), conv3x3(N, N, padding=p), ResidualBlock(N, p))
            for _ in sizes[:last]
        )
        self.restore_heads = nn.ModuleList(
            nn.Sequential(AttentionBlock(N, p), ResidualBlock(N, p), UpBlock(N, p)) for _ in sizes
        )
        self.quantizers = nn.ModuleList(
            MultiCodebookQuantizer(m, k, N // m, frequency_decay) for k in sizes
        )
        self._coders: dict[int, tuple[tuple, CategoricalCoder]] = {}

    # ---- the cascade --------------------------------------------------------------------------
    def set_temperature(self, temperature: float) -> None:
        """The Gumbel-softmax temperature T of the next training steps (the recipe anneals it)."""
        if not temperature > 0:
            raise ConfigError(f"the Gumbel temperature must be positive, got {temperature}")
        self.temperature = float(temperature)

    def _encode(
        self, x: Tensor, stochastic: bool
    ) -> tuple[list[Tensor], list[Tensor], list[Tensor]]:
        """Per level: dequantised latents, codes, bits (B,); Gumbel sampling when stochastic."""
        latent = self.encoder(x * 2 - 1)  # McQuic works on [-1, 1]
        quantized, codes, bits = [], [], []
        for level, quantizer in enumerate(self.quantizers):
            z = self.stage_encoders[level](latent)
            q, c, b = quantizer(self.quantization_heads[level](z), self.temperature, stochastic)
            quantized.append(q)
            codes.append(c)
            bits.append(b)
            if level < self.levels - 1:
                latent = self.latent_heads[level](z) - q
        return quantized, codes, bits

    def _decode(self, quantized: list[Tensor]) -> Tensor:
        restored = None
        for level in reversed(range(self.levels)):
            h = self.dequantization_heads[level](quantized[level])
            if restored is not None:
                h = h + self.side_heads[level](restored)
            restored = self.restore_heads[level](h)
        return (self.decoder(restored) + 1) / 2

    def _forward_padded(self, x: Tensor) -> CodecOutput:
        quantized, codes, bits = self._encode(x, stochastic=self.training)
        return CodecOutput(
            x_hat=self._decode(quantized),
            bits={f"level{level + 1}": b for level, b in enumerate(bits)},
            extras={"codes": codes},
        )

    # ---- code frequencies ---------------------------------------------------------------------
    def reassign_dead_codewords(
        self,
        threshold: float = 1e-6,
        generator: torch.Generator | None = None,
        source: str = "random",
    ) -> dict[str, float]:
        """Re-seed unused codewords on every level (`MultiCodebookQuantizer.reassign`); the
        fraction moved, per level and overall."""
        moved = [q.reassign(threshold, generator, source) for q in self.quantizers]
        sizes = [q.m * q.k for q in self.quantizers]
        fractions = {f"level{i + 1}": n / s for i, (n, s) in enumerate(zip(moved, sizes))}
        fractions["all"] = sum(moved) / sum(sizes)
        return fractions

    def codebooks(self) -> list[nn.Parameter]:
        """Every level's codebook (m, k, d): what reassignment changes and DDP must broadcast."""
        return [q.codebook for q in self.quantizers]

    # ---- real coding --------------------------------------------------------------------------
    def prepare_for_coding(self) -> None:
        for quantizer in self.quantizers:
            quantizer.freeze_table()

    def _coder(self, level: int) -> CategoricalCoder:
        table = self.quantizers[level].coding_table
        if int(table[0].sum()) == 0:
            raise LicError("mcquic: call prepare_for_coding() before coding (no frozen tables)")
        key = (table.data_ptr(), table._version)
        cached = self._coders.get(level)
        if cached is None or cached[0] != key:
            cached = (key, CategoricalCoder(list(table.cpu())))
            self._coders[level] = cached
        return cached[1]

    def _indexes(self, shape: tuple[int, ...]) -> Tensor:
        """The sub-codebook index of every code of a (1, m, h, w) code tensor."""
        return torch.arange(self.m).view(1, self.m, 1, 1).expand(shape)

    def _compress_padded(self, x: Tensor) -> tuple[list[bytes], tuple[int, ...]]:
        _, codes, _ = self._encode(x, stochastic=False)
        streams = [
            self._coder(level).encode(c.cpu(), self._indexes(tuple(c.shape)))
            for level, c in enumerate(codes)
        ]
        h, w = codes[-1].shape[-2:]
        return streams, (int(h), int(w))

    def expected_latent_shape(self, image_size: tuple[int, int]) -> tuple[int, ...]:
        """The coarsest level's shape: the padded image over that level's downsampling (half
        the stride under reflect padding)."""
        coarsest = 2 ** (3 + self.levels)
        return tuple(s // coarsest for s in padded_size(image_size, self.stride, self.min_side))

    def decode_codes(self, streams: list[bytes], latent_shape: tuple[int, ...]) -> list[Tensor]:
        """The codes (1, m, h_l, w_l) of every level, finest first, from the coded streams."""
        if len(streams) != self.levels or len(latent_shape) != 2:
            raise BitstreamError(
                f"mcquic expects {self.levels} streams and a 2-integer shape, "
                f"got {len(streams)} and {len(latent_shape)}"
            )
        h, w = latent_shape
        codes = []
        for level, stream in enumerate(streams):
            factor = 2 ** (self.levels - 1 - level)
            shape = (1, self.m, h * factor, w * factor)
            codes.append(self._coder(level).decode(stream, self._indexes(shape)))
        return codes

    def _decompress_padded(self, streams: list[bytes], latent_shape: tuple[int, ...]) -> Tensor:
        device = self.quantizers[0].codebook.device
        codes = self.decode_codes(streams, latent_shape)
        return self._decode([q.decode(c.to(device)) for q, c in zip(self.quantizers, codes)])

    def coding_report(self, x: Tensor, encoded: Encoded) -> dict[str, float]:
        """The raw bound m·Σ log2 k_l / 4^(3+l) and the frequency tables' entropy, both in bpp."""
        raw = sum(
            self.m * math.log2(k) / 4 ** (3 + level + 1)
            for level, k in enumerate(self.codebook_sizes)
        )
        entropy = sum(
            float(q.entropy_bits().sum()) / 4 ** (3 + level + 1)
            for level, q in enumerate(self.quantizers)
        )
        h, w = encoded.image_size
        return {
            "raw_bound_bpp": raw,
            "table_entropy_bpp": entropy,
            "streams_bpp": 8 * encoded.num_bytes() / (h * w),
        }


# ---- the authors' released files ----------------------------------------------------------------
# The official code (xiaosu-zhu/McQuic, v0.1.40) names its modules after its classes; each rule
# maps one of its names onto ours. Block internals are renamed last, everywhere.
OFFICIAL_RULES = [
    (r"^_encoder\.", "encoder."),
    (r"^_decoder\.", "decoder."),
    (r"^_quantizer\._entropyCoder\._freqEMA\.(\d+)$", r"quantizers.\1.frequency"),
    (r"^_quantizer\._encoders\.(\d+)\._quantizer\._codebook$", r"quantizers.\1.codebook"),
    (r"^_quantizer\._encoders\.(\d+)\._quantizer\._temperature$", r"quantizers.\1.logit_scale"),
    (r"^_quantizer\._encoders\.(\d+)\._quantizer\._bound\.", r"quantizers.\1.scale_bound."),
    (r"^_quantizer\._encoders\.(\d+)\._latentStageEncoder\.", r"stage_encoders.\1."),
    (r"^_quantizer\._encoders\.(\d+)\._quantizationHead\.", r"quantization_heads.\1."),
    (r"^_quantizer\._encoders\.(\d+)\._latentHead\.", r"latent_heads.\1."),
    (r"^_quantizer\._decoders\.(\d+)\._dequantizationHead\.", r"dequantization_heads.\1."),
    (r"^_quantizer\._decoders\.(\d+)\._sideHead\.", r"side_heads.\1."),
    (r"^_quantizer\._decoders\.(\d+)\._restoreHead\.", r"restore_heads.\1."),
    (r"\._branch\.", ".body."),
    (r"\._skip\.", ".skip."),
    (r"\._mainBranch\.", ".trunk."),
    (r"\._sideBranch\.", ".mask."),
    (r"\.lowerBound\.", ".lower_bound."),
    (r"_reparam\.eps$", "_reparam.pedestal"),
]
# The de-quantisers hold the same codebook Parameter as the quantiser (two more copies per level).
OFFICIAL_SHARED = r"_quantizer\._(en|de)coders\.(\d+)\._dequantizer\._codebook"
OFFICIAL_TRAINER_PREFIX = "module._compressor."
RELEASES = (
    "https://github.com/xiaosu-zhu/McQuic/releases (e.g. generic/qp_2_msssim_8e954998.mcquic)"
)


def _shape(value: Any) -> tuple[int, ...]:
    return tuple(getattr(value, "shape", value))


def official_architecture(state: Mapping[str, Any]) -> dict[str, Any]:
    """m, N and the codebook sizes of an official state dict (tensors or a key -> shape list),
    read off its codebooks (m, k_l, N/m)."""
    sizes, m, d, level = [], None, None, 0
    while (key := f"_quantizer._encoders.{level}._quantizer._codebook") in state:
        m, k, d = _shape(state[key])
        sizes.append(k)
        level += 1
    if not sizes:
        raise CheckpointError("not a McQuic state dict: no _quantizer._encoders.0 codebook")
    return {"m": m, "N": m * d, "codebook_sizes": sizes}


def official_state(state: Mapping[str, Any], codec: McQuic) -> dict[str, Any]:
    """An official state dict (tensors or a key -> shape list) under our names, for `codec`.

    The shared codebook copies are left out, the per-sub-codebook logit scales (m, 1, 1, 1)
    flattened to (m,), and the integer coding tables (which `prepare_for_coding` rebuilds from
    the imported frequencies) taken from `codec`."""
    ours = rename_state(state, OFFICIAL_RULES, drop=[OFFICIAL_SHARED])
    for key, value in ours.items():
        if key.endswith(".logit_scale"):
            ours[key] = value.reshape(-1) if isinstance(value, Tensor) else (math.prod(value),)
    own = codec.state_dict()
    ours.update({k: v for k, v in own.items() if k.endswith(".coding_table")})
    return ours


def released_state_dict(raw: Any, source: Path) -> dict[str, Tensor]:
    """The compressor's state dict of an official file: a released `.mcquic` ({model, config,
    version}), a training checkpoint ({trainer: {_model: ...}}) or a bare state dict."""
    if isinstance(raw, dict) and isinstance(raw.get("model"), dict):
        return raw["model"]
    if isinstance(raw, dict) and isinstance(raw.get("trainer"), dict):
        model = raw["trainer"].get("_model", {})
        prefix = OFFICIAL_TRAINER_PREFIX
        return {k[len(prefix) :]: v for k, v in model.items() if k.startswith(prefix)}
    if isinstance(raw, dict) and "_encoder.0.weight" in raw:
        return raw
    raise CheckpointError(
        f"{source} is not an official McQuic file: expected a released .mcquic "
        "({model, config, version}), a training checkpoint ({trainer: {_model}}) or a state dict"
    )


@register_format(
    "mcquic",
    published_at=f"the McQuic releases, {RELEASES}",
    search_dirs=torch_hub_checkpoint_dirs,
    help="McQuic's released .mcquic files and its training checkpoints (official code, v0.1.40)",
)
def import_mcquic(request: ImportRequest) -> McQuic:
    """An official McQuic file as our `McQuic` (reflect padding, as the official code pads).

    The architecture is read off the codebooks; the three copies of every codebook must agree."""
    raw = read_torch_file(request.source, "an official McQuic checkpoint")
    state = released_state_dict(raw, request.source)
    for key, value in state.items():
        match = re.fullmatch(OFFICIAL_SHARED, key)
        original = f"_quantizer._encoders.{match.group(2)}._quantizer._codebook" if match else None
        if original and not torch.equal(value, state.get(original, value)):
            raise CheckpointError(f"{request.source}: {key} differs from {original}")
    codec = McQuic(**official_architecture(state), padding="reflect")
    fit_state(codec, official_state(state, codec), str(request.source))
    return codec
