"""Finding and decoding images: every reader in the framework goes through `open_rgb`.

Decoding rules (the same for folders, LMDB entries, the CLI and evaluation):
- EXIF orientation is applied, so sizes and pixels are the upright image's.
- Grayscale, bilevel and palette images become RGB by repeating / looking up their colours.
- Alpha (RGBA, LA, PA, palette or grey with a transparent colour) is composited onto white and then
  dropped: codecs code colour, not transparency, and white is what a viewer shows a transparent
  page as.
- 16-bit images keep their top 8 bits (Pillow does this for 16-bit RGB; 16-bit grey is scaled by
  1/257 here, which maps 65535 to 255 exactly).
- CMYK (and YCbCr, LAB) JPEGs are converted by Pillow's plain formula, without colour management;
  Adobe's inverted CMYK is handled by Pillow's JPEG reader.
- Images of more than `max_pixels` pixels are refused before any pixel is decoded (decompression
  bombs), and a truncated or unreadable file is a `DataError` naming the file.
"""

from __future__ import annotations

import io
import logging
import warnings
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError
from torch import Tensor

from src.coding.container import MAX_PIXELS
from src.errors import DataError

log = logging.getLogger(__name__)

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".tif", ".tiff")
# MAX_PIXELS, 2**27 pixels (e.g. 16384 x 8192), is shared with coded files (src.coding.container):
# far above any photo dataset, far below what exhausts memory.
# EXIF orientations 5..8 swap width and height.
_TRANSPOSED_ORIENTATIONS = {5, 6, 7, 8}
_ALPHA_MODES = {"RGBA", "LA", "PA", "RGBa", "La"}
_DEEP_GREY_MODES = {"I", "I;16", "I;16B", "I;16L", "I;16N"}
_DECODE_ERRORS = (OSError, UnidentifiedImageError, ValueError, SyntaxError, EOFError)

ImageInput = str | Path | bytes


def list_images(root: str | Path) -> list[Path]:
    """Every image file under `root`, recursively, ordered by relative path (as LMDB keys are)."""
    root = Path(root)
    if not root.is_dir():
        raise DataError(f"image folder {root} does not exist or is not a directory")
    found = (p for p in root.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
    return sorted(found, key=lambda p: p.relative_to(root).as_posix())


def _label(source: ImageInput, name: str | None) -> str:
    if name is not None:
        return name
    return "<bytes>" if isinstance(source, bytes) else str(source)


def _open(source: ImageInput, max_pixels: int, label: str) -> Image.Image:
    """Open (header only) and refuse oversized images before decoding a pixel."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(source) if isinstance(source, bytes) else source)
    except Image.DecompressionBombError as err:
        raise DataError(f"{label}: refused as a decompression bomb ({err})") from err
    except FileNotFoundError as err:
        raise DataError(f"{label}: no such file") from err
    except UnidentifiedImageError as err:
        raise DataError(f"{label}: not an image Pillow can identify") from err
    except _DECODE_ERRORS as err:
        raise DataError(f"{label}: not a readable image ({err})") from err
    w, h = img.size
    if w * h > max_pixels:
        img.close()
        raise DataError(
            f"{label}: refused as a decompression bomb ({w}x{h} = {w * h} pixels "
            f"> the limit of {max_pixels})"
        )
    return img


def image_size(
    source: ImageInput, name: str | None = None, max_pixels: int = MAX_PIXELS
) -> tuple[int, int]:
    """(width, height) of the upright image from its header alone (no pixel is decoded)."""
    label = _label(source, name)
    with _open(source, max_pixels, label) as img:
        w, h = img.size
        try:
            orientation = img.getexif().get(0x0112)
        except _DECODE_ERRORS:
            orientation = None
    return (h, w) if orientation in _TRANSPOSED_ORIENTATIONS else (w, h)


def to_rgb(img: Image.Image) -> Image.Image:
    """An RGB image by the rules in the module docstring (alpha over white, 16-bit to 8-bit)."""
    if img.mode in _DEEP_GREY_MODES:
        arr = np.asarray(img, dtype=np.float64)
        img = Image.fromarray(np.clip(np.rint(arr / 257.0), 0, 255).astype(np.uint8))
    has_alpha = img.mode in _ALPHA_MODES or (
        img.mode in ("P", "L", "RGB", "1") and "transparency" in img.info
    )
    if has_alpha:
        rgba = img.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        img = Image.alpha_composite(white, rgba)
    return img.convert("RGB")


def open_rgb(
    source: ImageInput, name: str | None = None, max_pixels: int = MAX_PIXELS
) -> Image.Image:
    """Fully decode a file path or encoded bytes into an upright RGB Pillow image.

    Raises `DataError` (naming `name` or the path) for anything that is not a complete image.
    """
    label = _label(source, name)
    with _open(source, max_pixels, label) as img:
        try:
            img.load()
            img = ImageOps.exif_transpose(img)
            return to_rgb(img)
        except _DECODE_ERRORS as err:
            raise DataError(f"{label}: cannot be decoded ({err})") from err


def pil_to_tensor(img: Image.Image) -> Tensor:
    """(3, H, W) uint8 tensor of an RGB image."""
    arr = np.asarray(img, dtype=np.uint8)
    return torch.from_numpy(arr.copy()).permute(2, 0, 1).contiguous()


def decode_rgb(source: ImageInput, name: str | None = None, max_pixels: int = MAX_PIXELS) -> Tensor:
    """Decode a file path or encoded bytes into a (3, H, W) uint8 tensor (see `open_rgb`)."""
    return pil_to_tensor(open_rgb(source, name, max_pixels))


def pad_to_at_least(img: Tensor, size: int) -> Tensor:
    """Reflect-pad (or replicate where reflection is too short) so both sides are >= size."""
    h, w = img.shape[-2:]
    pad_h, pad_w = max(0, size - h), max(0, size - w)
    if pad_h == 0 and pad_w == 0:
        return img
    mode = "reflect" if pad_h < h and pad_w < w else "replicate"
    padded = torch.nn.functional.pad(img[None].float(), (0, pad_w, 0, pad_h), mode=mode)
    return padded[0].to(img.dtype)
