"""The Python side of the command line: load a codec, code files or tensors.

from src.api import load_codec, compress_file, decompress_file
codec = load_codec("RUN/checkpoints/best.ckpt")        # or an exported .codec file
compress_file(codec, "in.png", "out.lic")
decompress_file(codec, "out.lic", "rec.png")
data = codec.compress_to_bytes(x)                       # x: (1, 3, H, W) in [0, 1]
x_hat = codec.decompress_bytes(data, max_pixels=2**27)  # larger claims: BitstreamError
"""

from __future__ import annotations

from pathlib import Path

from src.codecs.base import Codec
from src.codecs.export import export_codec
from src.codecs.loading import load_codec
from src.coding.container import MAX_PIXELS, Rate
from src.datamodules.images import decode_rgb
from src.evaluation.baselines import to_pil

__all__ = ["Rate", "compress_file", "decompress_file", "export_codec", "load_codec"]


def compress_file(
    codec: Codec,
    source: str | Path,
    target: str | Path,
    rate: Rate | None = None,
    tile: int | None = None,
    levels: int | None = None,
) -> bytes:
    """Code the image file `source` into `target`; returns the bytes written.

    Grayscale and palette images are coded as RGB, alpha is composited onto white. `levels`
    writes only the first latent groups of a progressive codec.
    """
    device = next(codec.parameters()).device
    x = decode_rgb(source).float().div(255).unsqueeze(0).to(device)
    data = codec.compress_to_bytes(x, rate, tile=tile, levels=levels)
    Path(target).write_bytes(data)
    return data


def decompress_file(
    codec: Codec,
    source: str | Path,
    target: str | Path,
    levels: int | None = None,
    max_pixels: int = MAX_PIXELS,
) -> tuple[int, int]:
    """Decode the coded file `source` into the PNG (or any Pillow format) `target`; returns
    the image's (width, height). A file claiming more than `max_pixels` pixels is refused
    (BitstreamError) before anything is allocated."""
    x_hat = codec.decompress_bytes(Path(source).read_bytes(), levels, max_pixels)
    to_pil(x_hat).save(target)
    return int(x_hat.shape[-1]), int(x_hat.shape[-2])
