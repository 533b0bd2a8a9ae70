"""Robust decoding: every odd kind of image becomes upright 8-bit RGB, bad files a clear DataError."""

from __future__ import annotations

import io
import struct
import zlib

import numpy as np
import pytest
import torch
from PIL import Image

from src.datamodules.images import decode_rgb, image_size
from src.errors import DataError


def _encoded(img: Image.Image, fmt: str = "PNG", **kwargs) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **kwargs)
    return buf.getvalue()


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def _raw_png(width: int, height: int, bit_depth: int, color_type: int, rows: bytes) -> bytes:
    """A PNG written by hand (Pillow cannot write 16-bit RGB, nor lie about its size)."""
    header = struct.pack(">IIBBBBB", width, height, bit_depth, color_type, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + _png_chunk(b"IHDR", header)
        + _png_chunk(b"IDAT", zlib.compress(rows))
        + _png_chunk(b"IEND", b"")
    )


def test_grayscale_bilevel_and_palette_become_rgb():
    grey = Image.fromarray(np.arange(48, dtype=np.uint8).reshape(6, 8))
    x = decode_rgb(_encoded(grey))
    assert x.shape == (3, 6, 8) and x.dtype == torch.uint8
    assert torch.equal(x[0], x[1]) and torch.equal(x[0], torch.arange(48).reshape(6, 8).byte())
    assert decode_rgb(_encoded(grey.convert("1"))).shape == (3, 6, 8)
    palette = Image.new("RGB", (5, 4), (10, 200, 30)).convert("P", palette=Image.Palette.ADAPTIVE)
    assert decode_rgb(_encoded(palette))[:, 0, 0].tolist() == [10, 200, 30]


def test_alpha_is_composited_onto_white():
    rgba = Image.new("RGBA", (4, 4), (255, 0, 0, 0))  # fully transparent red: white
    assert torch.equal(decode_rgb(_encoded(rgba)), torch.full((3, 4, 4), 255, dtype=torch.uint8))
    half = Image.new("RGBA", (4, 4), (0, 0, 0, 128))  # half-transparent black: mid grey
    assert decode_rgb(_encoded(half))[:, 0, 0].tolist() == [127, 127, 127]
    la = Image.new("LA", (3, 3), (0, 255))  # opaque black stays black
    assert int(decode_rgb(_encoded(la)).max()) == 0
    palette = Image.new("P", (3, 3), 0)
    palette.putpalette([0, 0, 0] * 256)
    palette.info["transparency"] = 0  # the palette's transparent colour
    assert int(decode_rgb(_encoded(palette, transparency=0)).min()) == 255


def test_sixteen_bit_png_keeps_the_top_eight_bits():
    grey16 = Image.fromarray(np.array([[0, 257 * 100, 65535]], dtype=np.uint16))
    assert decode_rgb(_encoded(grey16))[0, 0].tolist() == [0, 100, 255]
    # 16-bit RGB, one row of two pixels: (0x1234, 0xff00, 0x0001) and white; filter byte 0.
    row = b"\x00" + struct.pack(">6H", 0x1234, 0xFF00, 0x0001, 0xFFFF, 0xFFFF, 0xFFFF)
    x = decode_rgb(_raw_png(2, 1, 16, 2, row))
    assert x[:, 0, 0].tolist() == [0x12, 0xFF, 0x00] and x[:, 0, 1].tolist() == [255, 255, 255]


def test_exif_orientation_is_applied_to_pixels_and_sizes():
    arr = np.zeros((20, 40, 3), dtype=np.uint8)
    arr[:, :20] = 255  # left half white
    exif = Image.Exif()
    exif[0x0112] = 6  # the camera was turned: rotate 90 degrees clockwise to view
    data = _encoded(Image.fromarray(arr), "JPEG", quality=95, exif=exif)
    x = decode_rgb(data)
    assert x.shape == (3, 40, 20) and image_size(data) == (20, 40)
    assert x[:, :10].float().mean() > 200 and x[:, 30:].float().mean() < 50  # white on top


def test_cmyk_jpeg_becomes_rgb():
    cmyk = Image.new("CMYK", (16, 16), (0, 255, 255, 0))  # pure red ink
    x = decode_rgb(_encoded(cmyk, "JPEG", quality=95))
    red, green, blue = x[:, 8, 8].tolist()
    assert red > 200 and green < 50 and blue < 50


def test_bad_files_are_clear_errors(tmp_path):
    noise = np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)
    good = _encoded(Image.fromarray(noise), "JPEG")
    with pytest.raises(DataError, match="cut.jpg: cannot be decoded .*truncated"):
        decode_rgb(good[: len(good) // 2], name="cut.jpg")
    with pytest.raises(DataError, match="notes.png: not an image"):
        decode_rgb(b"these are my notes", name="notes.png")
    with pytest.raises(DataError, match="no such file"):
        decode_rgb(tmp_path / "missing.png")


def test_decompression_bombs_are_refused_before_decoding():
    header_only = _raw_png(100_000, 100_000, 8, 2, b"")  # claims 10^10 pixels, holds none
    with pytest.raises(DataError, match="decompression bomb"):
        image_size(header_only, name="bomb.png")
    with pytest.raises(DataError, match="bomb.png: refused as a decompression bomb"):
        decode_rgb(header_only, name="bomb.png")
    small = _encoded(Image.new("RGB", (20, 20)))
    with pytest.raises(DataError, match="400 pixels > the limit of 100"):
        decode_rgb(small, max_pixels=100)
