"""The framework's one file format for a coded image.

    offset  size  field
    0       4     magic b"LIC1"
    4       1     format version (3; version 2 files, which have no coding order, still read)
    5       1     n = length of the codec name, then n bytes of UTF-8
    .       8     fingerprint of the codec's weights and config (see `fingerprint`)
    .       4+4   original image height, width (uint32)
    .       1     k = number of latent-shape integers, then k × uint32
    .       1     rate kind: 0 none, 1 discrete index, 2 continuous factor; then float64 value
                  when the kind is not 0 (variable-rate codecs such as QVRF)
    .       4     tile side in pixels (uint32; 0: the image was coded whole)
    .       1     coding order of an autoregressive latent: 0 raster, 1 wavefront (version 3)
    .       2     s = number of streams (uint16), then s × (uint32 length + bytes)
    end-4   4     CRC32 of everything before it

A tiled file (tile side t > 0) has an empty latent shape and one stream per t × t tile in raster
order; each such stream is a tile record: its latent shape and streams in the same encoding
(uint8 k, k × uint32, uint16 s, s × (uint32 length + bytes)).

Little-endian throughout. `unpack` checks the CRC before anything else, then every length
against the bytes that remain and every size against fixed bounds, so a truncated, flipped or
foreign file raises `BitstreamError` before any allocation or entropy decoder sees it. The real
bpp of an image is `8 * len(file) / (H * W)`, header included.
"""

from __future__ import annotations

import hashlib
import json
import math
import struct
import zlib
from dataclasses import dataclass

import torch
from torch import nn

from src.errors import LicError

MAGIC = b"LIC1"
VERSION = 3
READABLE_VERSIONS = (2, 3)
FINGERPRINT_BYTES = 8
MAX_SIDE = 1 << 16
MAX_STREAMS = 4096
MAX_SHAPE_DIMS = 8
MAX_STREAM_BYTES = 1 << 30
# The most pixels the framework decodes by default, from an image file or a coded one: 2^27
# (e.g. 16384 x 8192), in the spirit of Pillow's MAX_IMAGE_PIXELS; a larger claim is refused
# before any allocation.
MAX_PIXELS = 2**27


class BitstreamError(LicError):
    """A coded file that cannot be decoded: corrupt, truncated, foreign, or for another model."""


@dataclass(frozen=True)
class Rate:
    """The rate setting a variable-rate codec coded at: a discrete index or a continuous factor."""

    kind: str
    value: float

    def __post_init__(self) -> None:
        if self.kind not in RATE_KINDS:
            raise ValueError(f"rate kind must be one of {RATE_KINDS}, got {self.kind!r}")
        if not math.isfinite(self.value):
            raise ValueError(f"rate value must be finite, got {self.value}")

    @classmethod
    def index(cls, i: int) -> Rate:
        return cls("index", float(int(i)))

    @classmethod
    def factor(cls, f: float) -> Rate:
        return cls("factor", float(f))

    def __str__(self) -> str:
        return f"index {int(self.value)}" if self.kind == "index" else f"factor {self.value:g}"


RATE_KINDS = ("index", "factor")
# The orders an autoregressive latent can be coded in (src/codecs/context_model.py); codecs
# without a context model always write the first.
CODING_ORDERS = ("raster", "wavefront")


@dataclass
class Container:
    """The decoded header and streams of one file."""

    codec_name: str
    fingerprint: bytes
    image_size: tuple[int, int]
    latent_shape: tuple[int, ...]
    streams: list[bytes]
    rate: Rate | None = None
    tile: int = 0
    order: str = "raster"

    def tile_grid(self) -> tuple[int, int]:
        """Rows and columns of tiles (1 × 1 for an image coded whole)."""
        if not self.tile:
            return 1, 1
        h, w = self.image_size
        return -(-h // self.tile), -(-w // self.tile)


def fingerprint(module: nn.Module, config: dict) -> bytes:
    """8 bytes of SHA-256 over a codec's config and every tensor of its state (sorted by name)."""
    digest = hashlib.sha256(json.dumps(config, sort_keys=True, default=str).encode())
    for name, tensor in sorted(module.state_dict().items()):
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
    return digest.digest()[:FINGERPRINT_BYTES]


def _shape_and_streams(shape: tuple[int, ...], streams: list[bytes]) -> list[bytes]:
    if len(shape) > MAX_SHAPE_DIMS or len(streams) > MAX_STREAMS:
        raise ValueError("too many latent-shape integers or streams")
    parts = [struct.pack(f"<B{len(shape)}I", len(shape), *shape), struct.pack("<H", len(streams))]
    for stream in streams:
        parts += [struct.pack("<I", len(stream)), stream]
    return parts


def pack_tile(latent_shape: tuple[int, ...], streams: list[bytes]) -> bytes:
    """One tile's latent shape and streams as a single stream of a tiled file."""
    return b"".join(_shape_and_streams(latent_shape, streams))


def pack(container: Container) -> bytes:
    """Serialise a container (see the module docstring for the layout)."""
    name = container.codec_name.encode()
    h, w = container.image_size
    if not 0 < len(name) < 256:
        raise ValueError(f"codec name must be 1..255 bytes, got {len(name)}")
    if not (0 < h <= MAX_SIDE and 0 < w <= MAX_SIDE):
        raise ValueError(f"image size {h}x{w} is outside 1..{MAX_SIDE}")
    if len(container.fingerprint) != FINGERPRINT_BYTES:
        raise ValueError(f"fingerprint must be {FINGERPRINT_BYTES} bytes")
    parts = [MAGIC, struct.pack("<BB", VERSION, len(name)), name, container.fingerprint]
    parts.append(struct.pack("<II", h, w))
    rate = b"\x00"
    if container.rate is not None:
        rate = struct.pack("<Bd", RATE_KINDS.index(container.rate.kind) + 1, container.rate.value)
    shape = _shape_and_streams(container.latent_shape, [])[0]
    order = CODING_ORDERS.index(container.order)
    parts += [shape, rate, struct.pack("<IB", container.tile, order)]
    parts += _shape_and_streams((), container.streams)[1:]
    body = b"".join(parts)
    return body + struct.pack("<I", zlib.crc32(body))


class _Reader:
    """Reads little-endian fields, refusing to read past the end."""

    def __init__(self, data: bytes) -> None:
        self.data, self.pos = data, 0

    def take(self, n: int, what: str) -> bytes:
        if n < 0 or self.pos + n > len(self.data):
            raise BitstreamError(
                f"truncated file: {what} needs {n} bytes, {len(self.data) - self.pos} left"
            )
        chunk = self.data[self.pos : self.pos + n]
        self.pos += n
        return chunk

    def unpack(self, fmt: str, what: str) -> tuple:
        return struct.unpack(fmt, self.take(struct.calcsize(fmt), what))


def _read_shape(reader: _Reader) -> tuple[int, ...]:
    (dims,) = reader.unpack("<B", "latent-shape length")
    if dims > MAX_SHAPE_DIMS:
        raise BitstreamError(f"implausible latent shape with {dims} dimensions")
    shape = reader.unpack(f"<{dims}I", "latent shape")
    if any(not 0 < s <= MAX_SIDE for s in shape):
        raise BitstreamError(f"implausible latent shape {shape}")
    return tuple(shape)


def _read_streams(reader: _Reader) -> list[bytes]:
    (count,) = reader.unpack("<H", "stream count")
    if count > MAX_STREAMS:
        raise BitstreamError(f"implausible stream count {count}")
    streams = []
    for i in range(count):
        (length,) = reader.unpack("<I", f"length of stream {i}")
        if length > MAX_STREAM_BYTES:
            raise BitstreamError(f"implausible length {length} of stream {i}")
        streams.append(reader.take(length, f"stream {i}"))
    return streams


def _read_rate(reader: _Reader) -> Rate | None:
    (kind,) = reader.unpack("<B", "rate kind")
    if not kind:
        return None
    if kind > len(RATE_KINDS):
        raise BitstreamError(f"unknown rate kind {kind}")
    (value,) = reader.unpack("<d", "rate value")
    if not math.isfinite(value) or (
        kind == 1 and not (0 <= value < 1 << 16 and value == int(value))
    ):
        raise BitstreamError(f"implausible rate value {value}")
    return Rate(RATE_KINDS[kind - 1], value)


def _expect_end(reader: _Reader, what: str) -> None:
    if reader.pos != len(reader.data):
        raise BitstreamError(
            f"corrupt file: {len(reader.data) - reader.pos} unexpected bytes after the {what}"
        )


def unpack_tile(record: bytes) -> tuple[tuple[int, ...], list[bytes]]:
    """The latent shape and streams of one tile record of a tiled file."""
    reader = _Reader(record)
    shape = _read_shape(reader)
    streams = _read_streams(reader)
    _expect_end(reader, "tile's streams")
    return shape, streams


def unpack(data: bytes) -> Container:
    """Parse and validate a file written by `pack`; raises `BitstreamError` on anything wrong."""
    if len(data) < len(MAGIC) + 4 or data[: len(MAGIC)] != MAGIC:
        raise BitstreamError("not a lic-lab file (bad magic)")
    body, (crc,) = data[:-4], struct.unpack("<I", data[-4:])
    if zlib.crc32(body) != crc:
        raise BitstreamError("corrupt file: CRC32 does not match its contents")
    reader = _Reader(body)
    reader.take(len(MAGIC), "magic")
    version, name_len = reader.unpack("<BB", "version")
    if version not in READABLE_VERSIONS:
        raise BitstreamError(
            f"format version {version} is not supported (this reader knows {READABLE_VERSIONS})"
        )
    try:
        name = reader.take(name_len, "codec name").decode()
    except UnicodeDecodeError as err:
        raise BitstreamError("corrupt file: codec name is not UTF-8") from err
    print_ = reader.take(FINGERPRINT_BYTES, "fingerprint")
    h, w = reader.unpack("<II", "image size")
    if not (0 < h <= MAX_SIDE and 0 < w <= MAX_SIDE):
        raise BitstreamError(f"implausible image size {h}x{w}")
    shape = _read_shape(reader)
    rate = _read_rate(reader)
    (tile,) = reader.unpack("<I", "tile side")
    if tile > MAX_SIDE:
        raise BitstreamError(f"implausible tile side {tile}")
    order = 0
    if version >= 3:
        (order,) = reader.unpack("<B", "coding order")
        if order >= len(CODING_ORDERS):
            raise BitstreamError(f"unknown coding order {order}")
    streams = _read_streams(reader)
    _expect_end(reader, "streams")
    container = Container(name, print_, (h, w), shape, streams, rate, tile, CODING_ORDERS[order])
    rows, cols = container.tile_grid()
    if tile and len(streams) != rows * cols:
        raise BitstreamError(
            f"corrupt file: {len(streams)} tiles where a {w}x{h} image in {tile}-pixel tiles "
            f"has {rows * cols}"
        )
    return container


def keep_first_streams(data: bytes, count: int) -> bytes:
    """A file cut to the first `count` streams of its image (of every tile, for a tiled file).

    For a progressive codec, whose streams are its latent groups coarse to fine, this is the
    file `compress --levels count` writes: the header stays, the length table and CRC follow."""
    container = unpack(data)
    if count < 1:
        raise BitstreamError(f"a cut file keeps at least one stream, not {count}")
    if not container.tile:
        if count > len(container.streams):
            raise BitstreamError(f"the file holds {len(container.streams)} streams, not {count}")
        container.streams = container.streams[:count]
        return pack(container)
    records = []
    for record in container.streams:
        shape, streams = unpack_tile(record)
        if count > len(streams):
            raise BitstreamError(f"a tile of the file holds {len(streams)} streams, not {count}")
        records.append(pack_tile(shape, streams[:count]))
    container.streams = records
    return pack(container)
