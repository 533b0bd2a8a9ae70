"""Small synthetic images and bad files for the data tests (written into tmp dirs)."""

from __future__ import annotations

import io
import zlib
from pathlib import Path

import numpy as np
from PIL import Image


def image_bytes(size: tuple[int, int], seed: int, fmt: str = "PNG") -> bytes:
    """A smooth random (width, height) RGB image, encoded: compresses like a photo, not noise."""
    rng = np.random.default_rng(seed)
    w, h = size
    coarse = rng.integers(0, 256, (max(2, h // 8), max(2, w // 8), 3), dtype=np.uint8)
    img = Image.fromarray(coarse).resize((w, h), Image.Resampling.BILINEAR)
    buf = io.BytesIO()
    img.save(buf, format=fmt)
    return buf.getvalue()


def write_image(path: Path, size: tuple[int, int] = (80, 60), seed: int | None = None) -> Path:
    """Write an image whose format follows the suffix; the seed defaults to the name's hash."""
    fmt = {".jpg": "JPEG", ".jpeg": "JPEG", ".png": "PNG", ".webp": "WEBP", ".bmp": "BMP"}
    seed = zlib.crc32(path.name.encode()) if seed is None else seed
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(image_bytes(size, seed, fmt[path.suffix.lower()]))
    return path


def write_bad_files(folder: Path) -> dict[str, str]:
    """A corrupt, a truncated and a non-image file with image names; returns name -> kind."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "corrupt.jpg").write_bytes(b"\xff\xd8\xff\xe0" + bytes(range(256)) * 4)
    whole = image_bytes((96, 96), 7, "JPEG")
    (folder / "truncated.jpg").write_bytes(whole[: len(whole) // 2])
    (folder / "notes.png").write_text("not an image at all\n")
    return {"corrupt.jpg": "corrupt", "truncated.jpg": "truncated", "notes.png": "non-image"}
