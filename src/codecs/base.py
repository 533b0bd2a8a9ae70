"""The codec contract every family honours.

A codec maps an image in [0, 1] to a reconstruction plus a rate in bits, and turns an image into
bytes and back. Padding to the codec's stride happens here, once, for every family: subclasses
implement `_forward_padded`, `_compress_padded` and `_decompress_padded` on inputs whose height and
width are multiples of `stride`, and the base class pads on the way in and crops on the way out.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from src.coding.container import (
    MAX_PIXELS,
    MAX_SIDE,
    BitstreamError,
    Container,
    Rate,
    fingerprint,
    pack,
    pack_tile,
    unpack,
    unpack_tile,
)
from src.coding.rans import bound_entropy_coders
from src.errors import LicError


@dataclass
class CodecOutput:
    """What `Codec.forward` returns.

    `bits` maps a latent group name to a per-image bit count of shape (B,), differentiable
    (noise, straight-through or soft quantisation, as the family trains). `extras` carries whatever
    a recipe needs beyond that: latents, codes, logits.
    """

    x_hat: Tensor
    bits: dict[str, Tensor]
    extras: dict[str, Any] = field(default_factory=dict)

    def total_bits(self) -> Tensor:
        """Per-image sum of the bits of every latent group, shape (B,)."""
        return torch.stack(list(self.bits.values()), dim=0).sum(dim=0)


@dataclass
class Encoded:
    """One image as bytes: the entropy-coded streams plus the integers needed to decode them.

    `rate` is the setting a variable-rate codec coded at; it travels in the container header so
    decoding needs no flag.
    """

    streams: list[bytes]
    latent_shape: tuple[int, ...]
    image_size: tuple[int, int]
    rate: Rate | None = None
    order: str = "raster"

    def num_bytes(self) -> int:
        """Bytes taken by the streams alone (the container adds its header on top)."""
        return sum(len(s) for s in self.streams)


def padded_size(size: tuple[int, int], stride: int, min_side: int = 0) -> tuple[int, int]:
    """(H, W) rounded up to multiples of `stride`, and to at least `min_side` (a multiple of it)."""
    return tuple(max(-(-s // stride) * stride, min_side) for s in size)  # type: ignore[return-value]


def pad_to_multiple(
    x: Tensor, stride: int, min_side: int = 0
) -> tuple[Tensor, tuple[int, int, int, int]]:
    """Pad (B, C, H, W) on the right and bottom to multiples of `stride` (and to at least
    `min_side`, for networks whose reflection padding needs a few rows) by edge replication.

    Returns the padded tensor and the (left, right, top, bottom) padding that was applied.
    Replication keeps the padded border cheap to code; the cropped output never sees it.
    """
    h, w = x.shape[-2:]
    target_h, target_w = padded_size((h, w), stride, min_side)
    pad_h, pad_w = target_h - h, target_w - w
    padding = (0, pad_w, 0, pad_h)
    if pad_h == 0 and pad_w == 0:
        return x, padding
    mode = "replicate" if min(h, w) > 1 else "constant"
    return F.pad(x, padding, mode=mode), padding


def tile_regions(size: tuple[int, int], tile: int | None) -> list[tuple[slice, slice]]:
    """The (rows, cols) slices a `size` image is coded in, raster order: one region when `tile`
    is None or the image fits in one tile."""
    h, w = size
    if tile is None or (h <= tile and w <= tile):
        return [(slice(0, h), slice(0, w))]
    return [
        (slice(top, min(top + tile, h)), slice(left, min(left + tile, w)))
        for top in range(0, h, tile)
        for left in range(0, w, tile)
    ]


def check_image_size(size: tuple[int, int], max_pixels: int = MAX_PIXELS) -> None:
    """Refuse a coded image of more than `max_pixels` pixels (or an impossible side) before
    anything is allocated for it."""
    h, w = size
    if not (0 < h <= MAX_SIDE and 0 < w <= MAX_SIDE):
        raise BitstreamError(f"image size field: {w}x{h} is outside 1..{MAX_SIDE}")
    if h * w > max_pixels:
        raise BitstreamError(
            f"image size field: {w}x{h} = {h * w} pixels is more than max_pixels={max_pixels}"
        )


def crop_to(x: Tensor, size: tuple[int, int]) -> Tensor:
    """Crop (B, C, H', W') back to the top-left (H, W)."""
    h, w = size
    return x[..., :h, :w]


class Codec(nn.Module):
    """Base class of every learned codec in the framework.

    Subclasses set `stride` (the product of all downsampling factors) and implement the three
    `_*_padded` methods. `aux_parameters()` names the parameters that only an auxiliary loss
    trains (CompressAI's quantiles); `entropy_parameters()` names the density parameters of the
    entropy models, which the recipe may train at their own learning rate.

    Variable-rate codecs set `num_rates` > 1 and override `set_rate` / `current_rate` /
    `rate_error`; the rate is model state (the recipe sets it per batch, `compress` per file).
    Progressive codecs set `progressive = True` and accept `levels` in `_decompress_padded`.

    Decoding validates before it decodes: `check_encoded` compares what a file says with what
    this codec writes for its image size (`expected_latent_shape`, `stream_counts`, the rate)
    and refuses anything else with a `BitstreamError` naming the field, before an entropy
    decoder or an allocation sees it. Families declare `num_streams` (the streams of a complete
    file; a progressive file may hold its first 1..num_streams) and, where the latent is not
    the padded image over `stride`, override `expected_latent_shape`.
    """

    name: str = "codec"
    stride: int = 1
    num_rates: int = 1
    progressive: bool = False
    num_streams: int = 1
    # Images smaller than this (a multiple of `stride`) are padded up to it: reflection padding
    # deep inside some networks (HiFIC's) needs a few rows at the coarsest scale.
    min_side: int = 0
    # Orders this codec can code its latent in (context models: raster or wavefront) and the one
    # `compress` uses; the order travels in the file, so `decompress` needs no flag.
    coding_orders: tuple[str, ...] = ("raster",)
    coding_order: str = "raster"

    def __init__(self) -> None:
        super().__init__()
        self._init_args: dict[str, Any] = {}
        self._fingerprint_cache: tuple[tuple, bytes] | None = None
        self._register_load_state_dict_pre_hook(self._resize_buffers_to_incoming)

    def _record_config(self, **init_args: Any) -> None:
        """Remember the constructor arguments so a checkpoint can rebuild this codec alone."""
        self._init_args = dict(init_args)

    def config(self) -> dict[str, Any]:
        """A Hydra-instantiable description of this codec: `_target_` plus its arguments."""
        cls = type(self)
        return {"_target_": f"{cls.__module__}.{cls.__qualname__}", **self._init_args}

    # ---- the contract -------------------------------------------------------------------------
    def forward(self, x: Tensor) -> CodecOutput:
        """Reconstruct `x` (B, 3, H, W) in [0, 1] and count its bits per image."""
        size = tuple(x.shape[-2:])
        x_padded, _ = pad_to_multiple(x, self.stride, self.min_side)
        out = self._forward_padded(x_padded)
        out.x_hat = crop_to(out.x_hat, size)
        return out

    @torch.no_grad()
    def compress(self, x: Tensor, rate: Rate | None = None) -> Encoded:
        """Entropy-code one image (1, 3, H, W) or (3, H, W) into bytes, at `rate` if given."""
        if rate is not None:
            self.set_rate(rate)
        if x.dim() == 3:
            x = x.unsqueeze(0)
        if x.shape[0] != 1:
            raise ValueError(f"compress takes one image at a time, got a batch of {x.shape[0]}")
        size = (int(x.shape[-2]), int(x.shape[-1]))
        x_padded, _ = pad_to_multiple(x, self.stride, self.min_side)
        streams, latent_shape = self._compress_padded(x_padded)
        return Encoded(streams, tuple(latent_shape), size, self.current_rate(), self.coding_order)

    # ---- what a file must hold -----------------------------------------------------------------
    def expected_latent_shape(self, image_size: tuple[int, int]) -> tuple[int, ...]:
        """The latent shape this codec writes for an image of `image_size` (H, W): the padded
        size over the stride (families whose header shape differs override this)."""
        h, w = padded_size(image_size, self.stride, self.min_side)
        return (h // self.stride, w // self.stride)

    def stream_counts(self) -> range:
        """How many streams a file may hold: `num_streams`, or 1..num_streams if progressive."""
        return range(1 if self.progressive else self.num_streams, self.num_streams + 1)

    def rate_error(self, rate: Rate) -> str | None:
        """Why this codec cannot code at `rate` (None when it can); variable-rate codecs override."""
        return f"{self.name} codes at a single rate; it takes no rate index or factor"

    def check_encoded(
        self, encoded: Encoded, levels: int | None = None, max_pixels: int = MAX_PIXELS
    ) -> None:
        """Refuse, with a `BitstreamError` naming the field, an `Encoded` this codec would not
        have written for its image size; nothing is decoded or allocated before this passes."""
        h, w = encoded.image_size
        check_image_size((h, w), max_pixels)
        expected = self.expected_latent_shape((h, w))
        if tuple(encoded.latent_shape) != tuple(expected):
            raise BitstreamError(
                f"latent shape field: {self.name} codes a {w}x{h} image with latent shape "
                f"{tuple(expected)}, the file says {tuple(encoded.latent_shape)}"
            )
        counts = self.stream_counts()
        if len(encoded.streams) not in counts:
            allowed = str(counts.start) if len(counts) == 1 else f"{counts.start}..{counts[-1]}"
            raise BitstreamError(
                f"stream count field: {self.name} files hold {allowed} streams, "
                f"the file has {len(encoded.streams)}"
            )
        if self.num_rates == 1 and encoded.rate is not None:
            raise BitstreamError(
                f"rate field: {self.rate_error(encoded.rate)} (file: {encoded.rate})"
            )
        if self.num_rates > 1:
            problem = "missing" if encoded.rate is None else self.rate_error(encoded.rate)
            if problem:
                raise BitstreamError(f"rate field: {problem}")
        if encoded.order not in self.coding_orders:
            raise BitstreamError(
                f"coding order field: the file was coded in {encoded.order} order, which "
                f"{self.name} does not use"
            )
        if levels is not None and self.progressive and not 0 <= levels <= self.num_streams:
            raise LicError(
                f"{self.name} has {self.num_streams} coded groups; levels must be in "
                f"0..{self.num_streams}, not {levels}"
            )

    @torch.no_grad()
    def decompress(
        self, encoded: Encoded, levels: int | None = None, max_pixels: int = MAX_PIXELS
    ) -> Tensor:
        """Decode `encoded` into (1, 3, H, W) in [0, 1], cropped to the original size.

        `levels` decodes only the first latent groups of a progressive codec. The fields are
        checked first (`check_encoded`), and CompressAI's entropy models decode through a
        bounded rANS decoder (`src.coding.rans`).
        """
        self.check_encoded(encoded, levels, max_pixels)
        bound_entropy_coders(self)
        if encoded.rate is not None:
            self.set_rate(encoded.rate)
        if levels is not None and not self.progressive:
            raise LicError(f"{self.name} is not a progressive codec; it takes no levels")
        own_order, self.coding_order = self.coding_order, encoded.order
        try:
            if levels is None:
                x_hat = self._decompress_padded(encoded.streams, encoded.latent_shape)
            else:
                x_hat = self._decompress_padded(
                    encoded.streams, encoded.latent_shape, levels=levels
                )
        finally:
            self.coding_order = own_order
        return crop_to(x_hat.clamp(0, 1), encoded.image_size)

    def set_rate(self, rate: Rate) -> None:
        """Code and reconstruct at `rate` from now on (variable-rate codecs override this)."""
        raise LicError(self.rate_error(rate))

    def current_rate(self) -> Rate | None:
        """The rate setting in use, written into the container header (None: a fixed rate)."""
        return None

    def set_coding_options(self, **options: Any) -> None:
        """Coding knobs that leave the model as it is (iREC's beams and candidate counts, ...).

        Families with such knobs override this; by default any option is refused by name.
        """
        if options:
            raise LicError(
                f"{self.name} takes no coding options (got {', '.join(sorted(options))})"
            )

    def coding_report(self, x: Tensor, encoded: Encoded) -> dict[str, float]:
        """Family-specific figures for evaluate.py's per-image CSV (KL, raw bound, ...)."""
        return {}

    def fingerprint(self) -> bytes:
        """The container fingerprint of the current weights and config.

        Hashing every weight costs tens of milliseconds, so it is cached and recomputed only when
        some tensor of the state has been modified in place since (PyTorch's version counters).
        """
        state = self.state_dict(keep_vars=True)
        key = tuple((name, t.data_ptr(), t._version) for name, t in state.items())
        if self._fingerprint_cache is None or self._fingerprint_cache[0] != key:
            self._fingerprint_cache = (key, fingerprint(self, self.config()))
        return self._fingerprint_cache[1]

    def compress_to_bytes(
        self,
        x: Tensor,
        rate: Rate | None = None,
        tile: int | None = None,
        levels: int | None = None,
    ) -> bytes:
        """One image as a complete file in the framework's container format.

        With `tile`, an image larger than `tile` × `tile` is coded tile by tile (each tile on its
        own, so memory is bounded by the tile, not the image); `tile` must be a multiple of the
        codec's stride. Decoding needs no flag: the tile side travels in the header. With
        `levels`, a progressive codec writes only its first `levels` latent groups.
        """
        if x.dim() == 3:
            x = x.unsqueeze(0)
        h, w = x.shape[-2:]
        regions = tile_regions((h, w), tile)
        if len(regions) == 1:
            return self.pack(self.keep_levels(self.compress(x, rate), levels))
        if tile <= 0 or tile % self.stride:
            raise LicError(f"tile side must be a positive multiple of {self.stride}, got {tile}")
        records = []
        for rows, cols in regions:
            encoded = self.keep_levels(self.compress(x[..., rows, cols], rate), levels)
            records.append(pack_tile(encoded.latent_shape, encoded.streams))
        container = Container(
            codec_name=self.name,
            fingerprint=self.fingerprint(),
            image_size=(h, w),
            latent_shape=(),
            streams=records,
            rate=self.current_rate(),
            tile=tile,
            order=self.coding_order,
        )
        return pack(container)

    def keep_levels(self, encoded: Encoded, levels: int | None) -> Encoded:
        """`encoded` with only its first `levels` streams (None: all of them). A progressive
        codec's streams are its latent groups, coarse to fine, so the first k decode alone."""
        if levels is None:
            return encoded
        if not self.progressive:
            raise LicError(f"{self.name} is not a progressive codec; it takes no levels")
        if not 1 <= levels <= len(encoded.streams):
            raise LicError(
                f"{self.name} codes {len(encoded.streams)} groups; levels must be in "
                f"1..{len(encoded.streams)}, got {levels}"
            )
        return replace(encoded, streams=encoded.streams[:levels])

    def pack(self, encoded: Encoded) -> bytes:
        """`encoded` as a complete file, stamped with this codec's name and fingerprint."""
        container = Container(
            codec_name=self.name,
            fingerprint=self.fingerprint(),
            image_size=encoded.image_size,
            latent_shape=encoded.latent_shape,
            streams=encoded.streams,
            rate=encoded.rate,
            order=encoded.order,
        )
        return pack(container)

    def decompress_bytes(
        self, data: bytes, levels: int | None = None, max_pixels: int = MAX_PIXELS
    ) -> Tensor:
        """Decode a file written by `compress_to_bytes` of this very codec (weights and config).

        A file claiming more than `max_pixels` pixels is refused before anything is allocated; a
        tiled file is decoded one tile at a time, each tile checked like a whole file.
        """
        container = unpack(data)
        if container.codec_name != self.name:
            raise BitstreamError(
                f"file was written by a {container.codec_name} codec, not {self.name}"
            )
        if container.fingerprint != self.fingerprint():
            raise BitstreamError(
                f"file was written by another {self.name} model (weights or config differ)"
            )
        if not container.tile:
            encoded = Encoded(
                container.streams,
                container.latent_shape,
                container.image_size,
                container.rate,
                container.order,
            )
            return self.decompress(encoded, levels, max_pixels)
        h, w = container.image_size
        check_image_size((h, w), max_pixels)
        if container.tile % self.stride or container.latent_shape:
            raise BitstreamError(
                f"tile field: {self.name} tiles are multiples of {self.stride} pixels with no "
                f"latent shape of their own, the file says {container.tile} and "
                f"{container.latent_shape}"
            )
        x_hat = torch.empty(1, 3, h, w, device=next(self.parameters()).device)
        for (rows, cols), record in zip(tile_regions((h, w), container.tile), container.streams):
            shape, streams = unpack_tile(record)
            size = (rows.stop - rows.start, cols.stop - cols.start)
            encoded = Encoded(streams, shape, size, container.rate, container.order)
            x_hat[..., rows, cols] = self.decompress(encoded, levels, max_pixels)
        return x_hat

    def prepare_for_coding(self) -> None:
        """Freeze whatever real coding needs (CDF tables, code frequencies). Idempotent."""

    def aux_loss(self) -> Tensor | None:
        """Loss of the auxiliary parameters, or None when the codec has none."""
        return None

    def aux_parameters(self) -> Iterator[nn.Parameter]:
        """Parameters trained only by `aux_loss` (none by default)."""
        return iter(())

    def entropy_parameters(self) -> Iterator[nn.Parameter]:
        """Density parameters of the entropy models (none by default)."""
        return iter(())

    # ---- for subclasses -----------------------------------------------------------------------
    def _forward_padded(self, x: Tensor) -> CodecOutput:
        raise NotImplementedError

    def _compress_padded(self, x: Tensor) -> tuple[list[bytes], tuple[int, ...]]:
        raise NotImplementedError

    def _decompress_padded(self, streams: list[bytes], latent_shape: tuple[int, ...]) -> Tensor:
        raise NotImplementedError

    # ---- checkpoints --------------------------------------------------------------------------
    def _resize_buffers_to_incoming(
        self, state_dict: dict[str, Tensor], prefix: str, *_: Any
    ) -> None:
        """Give every buffer the shape it has in the incoming state dict before it is copied.

        Coding tables (CompressAI's `_quantized_cdf`, `_offset`, `_cdf_length`, `scale_table`)
        change size once they are built, so a fresh codec cannot take a prepared checkpoint
        without this (CompressAI issues #75 and #113). It runs whichever parent loads the codec.
        """
        for name, buffer in self.named_buffers():
            incoming = state_dict.get(prefix + name)
            if incoming is not None and buffer is not None and incoming.shape != buffer.shape:
                buffer.resize_(incoming.shape)
