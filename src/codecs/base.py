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
    BitstreamError,
    Container,
    Rate,
    fingerprint,
    pack,
    pack_tile,
    unpack,
    unpack_tile,
)
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


def pad_to_multiple(x: Tensor, stride: int) -> tuple[Tensor, tuple[int, int, int, int]]:
    """Pad (B, C, H, W) on the right and bottom to multiples of `stride` by edge replication.

    Returns the padded tensor and the (left, right, top, bottom) padding that was applied.
    Replication keeps the padded border cheap to code; the cropped output never sees it.
    """
    h, w = x.shape[-2:]
    pad_h = (-h) % stride
    pad_w = (-w) % stride
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

    Variable-rate codecs set `num_rates` > 1 and override `set_rate` / `current_rate`; the rate
    is model state (the recipe sets it per batch, `compress` per file). Progressive codecs set
    `progressive = True` and accept `levels` in `_decompress_padded`.
    """

    name: str = "codec"
    stride: int = 1
    num_rates: int = 1
    progressive: bool = False
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
        x_padded, _ = pad_to_multiple(x, self.stride)
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
        x_padded, _ = pad_to_multiple(x, self.stride)
        streams, latent_shape = self._compress_padded(x_padded)
        return Encoded(streams, tuple(latent_shape), size, self.current_rate(), self.coding_order)

    @torch.no_grad()
    def decompress(self, encoded: Encoded, levels: int | None = None) -> Tensor:
        """Decode `encoded` into (1, 3, H, W) in [0, 1], cropped to the original size.

        `levels` decodes only the first latent groups of a progressive codec.
        """
        if encoded.rate is not None:
            self.set_rate(encoded.rate)
        if levels is not None and not self.progressive:
            raise LicError(f"{self.name} is not a progressive codec; it takes no levels")
        if encoded.order not in self.coding_orders:
            raise BitstreamError(
                f"file was coded in {encoded.order} order, which {self.name} does not use"
            )
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
        raise LicError(f"{self.name} codes at a single rate; it takes no rate index or factor")

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

    def decompress_bytes(self, data: bytes, levels: int | None = None) -> Tensor:
        """Decode a file written by `compress_to_bytes` of this very codec (weights and config)."""
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
            return self.decompress(encoded, levels)
        h, w = container.image_size
        x_hat = torch.empty(1, 3, h, w, device=next(self.parameters()).device)
        for (rows, cols), record in zip(tile_regions((h, w), container.tile), container.streams):
            shape, streams = unpack_tile(record)
            size = (rows.stop - rows.start, cols.stop - cols.start)
            encoded = Encoded(streams, shape, size, container.rate, container.order)
            x_hat[..., rows, cols] = self.decompress(encoded, levels)
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
