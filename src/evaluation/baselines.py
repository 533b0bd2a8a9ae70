"""Classical codecs (JPEG, WebP, AVIF, HEVC intra, JPEG XL) on the same images and metrics as the
learned ones.

Pillow codes JPEG, WebP and AVIF (Pillow 11.3+ wheels ship AVIF; else avifenc/avifdec when
installed); HEVC intra comes from pillow-heif (libheif with x265: `hevc` at 4:4:4, the BPG-444-like
anchor learned-compression papers report against, and `hevc420`), JPEG XL from pillow-jxl-plugin,
both pip dependencies, with cjxl/djxl on PATH as a fallback. Each runs over a quality ladder; the
curves of a test set are cached per dataset, so a sweep of evaluations codes them once.
"""

from __future__ import annotations

import hashlib
import importlib
import io
import json
import shutil
import subprocess
import tempfile
from collections.abc import Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np
import PIL
import torch
from PIL import Image
from torch import Tensor

from src.errors import ConfigError
from src.evaluation.metrics import ms_ssim, psnr
from src.utils.progress import track

DEFAULT_QUALITIES = (1, 2, 3, 5, 8, 10, 15, 20, 25, 30, 40, 50, 60, 70, 80, 90, 95)


@dataclass
class BaselinePoint:
    """One image coded at one quality setting."""

    quality: int
    bpp: float
    psnr: float
    ms_ssim: float


def to_pil(x: Tensor) -> Image.Image:
    """(1, 3, H, W) or (3, H, W) in [0, 1] to an 8-bit RGB image."""
    arr = x.squeeze(0).clamp(0, 1).mul(255).round().byte().permute(1, 2, 0).cpu().numpy()
    return Image.fromarray(arr, "RGB")


def from_pil(img: Image.Image) -> Tensor:
    """An RGB image to (1, 3, H, W) in [0, 1]."""
    arr = np.asarray(img.convert("RGB"), dtype=np.uint8)
    return torch.from_numpy(arr.copy()).permute(2, 0, 1).float().div(255).unsqueeze(0)


@dataclass(frozen=True)
class ClassicalCodec:
    """A classical image codec over a quality ladder: Pillow's plug-ins or a command-line pair."""

    name: str
    qualities: tuple[int, ...] = DEFAULT_QUALITIES
    pillow_format: str | None = None
    commands: tuple[str, str] | None = None
    suffix: str = ""
    # A Pillow plug-in package and, after a colon, the function that registers it ("" when
    # importing it is enough), and the keyword options every save passes (chroma subsampling).
    plugin: str | None = None
    options: tuple[tuple[str, object], ...] = ()

    def _load_plugin(self) -> str | None:
        """Import and register the plug-in; its version, or None where it is not installed."""
        module_name, _, register = (self.plugin or "").partition(":")
        try:
            module = importlib.import_module(module_name)
        except ImportError:
            return None
        if register:
            getattr(module, register)()
        return str(getattr(module, "__version__", "?"))

    def available(self) -> bool:
        """Whether this machine can run it (Pillow built with or extended by the format, or the
        tools on PATH)."""
        if self.pillow_format is not None:
            if self.plugin is not None and self._load_plugin() is None:
                return False
            Image.init()  # load every plug-in, so SAVE lists all the formats this build writes
            return self.pillow_format.upper() in Image.SAVE
        return all(shutil.which(c) for c in self.commands or ())

    def description(self) -> str:
        """What produced the numbers (goes into the JSON and the cache key)."""
        if self.pillow_format is not None:
            plugin = (
                f" via {self.plugin.partition(':')[0]} {self._load_plugin()}" if self.plugin else ""
            )
            options = "".join(f" {k}={v}" for k, v in self.options)
            return f"Pillow {PIL.__version__} {self.pillow_format}{plugin}{options}"
        return " + ".join(self.commands or ())

    def code(self, img: Image.Image, quality: int) -> tuple[int, Image.Image]:
        """The coded size in bytes and the decoded image at `quality`."""
        if self.pillow_format is not None:
            buf = io.BytesIO()
            img.save(buf, format=self.pillow_format, quality=int(quality), **dict(self.options))
            data = buf.getvalue()
            return len(data), Image.open(io.BytesIO(data)).convert("RGB")
        encoder, decoder = self.commands
        with tempfile.TemporaryDirectory() as tmp:
            src, coded, out = Path(tmp, "in.png"), Path(tmp, "x" + self.suffix), Path(tmp, "o.png")
            img.save(src)
            for cmd in (
                [encoder, str(src), str(coded), "-q", str(quality)],
                [decoder, str(coded), str(out)],
            ):
                subprocess.run(cmd, check=True, capture_output=True)
            return coded.stat().st_size, Image.open(out).convert("RGB")

    def curve(self, x: Tensor) -> list[BaselinePoint]:
        """Code `x` (1, 3, H, W) at every quality of the ladder."""
        img = to_pil(x)
        points = []
        for q in self.qualities:
            size, decoded = self.code(img, q)
            x_hat = from_pil(decoded)
            points.append(
                BaselinePoint(
                    quality=int(q),
                    bpp=8 * size / (img.height * img.width),
                    psnr=float(psnr(x, x_hat)),
                    ms_ssim=float(ms_ssim(x, x_hat)),
                )
            )
        return points


# JPEG is Pillow's libjpeg with its default 4:2:0 subsampling; AVIF falls back to avifenc/avifdec,
# JPEG XL to cjxl/djxl. HEVC is x265 intra inside a HEIF file (its few hundred bytes of container
# are counted, as a file's are).
HEIF = "pillow_heif:register_heif_opener"
CLASSICAL_CODECS = {
    "jpeg": [ClassicalCodec("jpeg", pillow_format="JPEG")],
    "webp": [ClassicalCodec("webp", pillow_format="WEBP")],
    "avif": [
        ClassicalCodec("avif", pillow_format="AVIF"),
        ClassicalCodec("avif", commands=("avifenc", "avifdec"), suffix=".avif"),
    ],
    "hevc": [ClassicalCodec("hevc", pillow_format="HEIF", plugin=HEIF, options=(("chroma", 444),))],
    "hevc420": [
        ClassicalCodec("hevc420", pillow_format="HEIF", plugin=HEIF, options=(("chroma", 420),))
    ],
    "jxl": [
        ClassicalCodec("jxl", pillow_format="JXL", plugin="pillow_jxl"),
        ClassicalCodec("jxl", commands=("cjxl", "djxl"), suffix=".jxl"),
    ],
}


def classical_codec(name: str, qualities: Sequence[int] | None = None) -> ClassicalCodec | None:
    """The first available implementation of a classical codec (over `qualities` if given, else
    the default ladder), or None on this machine."""
    if name not in CLASSICAL_CODECS:
        raise ConfigError(f"unknown baseline {name!r}; choose from {', '.join(CLASSICAL_CODECS)}")
    codec = next((c for c in CLASSICAL_CODECS[name] if c.available()), None)
    if codec is None or qualities is None:
        return codec
    return replace(codec, qualities=tuple(int(q) for q in qualities))


def dataset_key(images: list[Tensor], names: list[str]) -> str:
    """A short hash of a test set's names and 8-bit pixels: the baseline cache's key."""
    digest = hashlib.sha256()
    for x, name in zip(images, names):
        digest.update(name.encode())
        digest.update(str(tuple(x.shape)).encode())
        digest.update(x.mul(255).round().byte().cpu().numpy().tobytes())
    return digest.hexdigest()[:16]


def baseline_curves(
    codec: ClassicalCodec,
    images: list[Tensor],
    names: list[str],
    cache_dir: str | Path | None,
) -> dict:
    """Per-image curves of a classical codec on a test set, read from or written to the cache.

    Returns CompressAI's results layout (name, description, results: mean bpp / psnr-rgb /
    ms-ssim-rgb per quality) plus `images`: each image's own curve, which the per-image
    comparisons need. Cached as `<cache_dir>/<dataset key>/<codec>.json`.
    """
    path = None
    if cache_dir is not None:
        path = Path(cache_dir) / dataset_key(images, names) / f"{codec.name}.json"
        if path.is_file():
            cached = json.loads(path.read_text())
            same_ladder = cached["results"].get("quality") == list(codec.qualities)
            if cached.get("source") == codec.description() and same_ladder:
                return cached
    per_image = {}
    for x, name in track(list(zip(images, names)), description=f"{codec.name} ladder"):
        per_image[name] = [asdict(p) for p in codec.curve(x)]
    mean = {
        key: [
            float(np.mean([curve[i][key] for curve in per_image.values()]))
            for i in range(len(codec.qualities))
        ]
        for key in ("bpp", "psnr", "ms_ssim")
    }
    payload = {
        "name": codec.name,
        "description": f"{codec.description()}; means over {len(names)} images",
        "source": codec.description(),
        "results": {
            "quality": list(codec.qualities),
            "bpp": mean["bpp"],
            "psnr-rgb": mean["psnr"],
            "ms-ssim-rgb": mean["ms_ssim"],
        },
        "images": per_image,
    }
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(payload, indent=1))
    return payload


def image_curve(payload: dict, name: str) -> list[BaselinePoint]:
    """One image's curve out of `baseline_curves`' result."""
    return [BaselinePoint(**p) for p in payload["images"][name]]


def quality_at_rate(curve: list[BaselinePoint], bpp: float, metric: str = "psnr") -> float:
    """The baseline's metric at `bpp`, linear in log-rate between its points (NaN outside)."""
    rates = np.log([p.bpp for p in curve])
    values = np.array([getattr(p, metric) for p in curve])
    order = np.argsort(rates)
    rates, values = rates[order], values[order]
    if not rates[0] <= np.log(bpp) <= rates[-1]:
        return float("nan")
    return float(np.interp(np.log(bpp), rates, values))


def rate_at_quality(curve: list[BaselinePoint], value: float, metric: str = "psnr") -> float:
    """The baseline's bpp to reach `value` of `metric`, by the same interpolation (NaN outside)."""
    values = np.array([getattr(p, metric) for p in curve])
    rates = np.log([p.bpp for p in curve])
    order = np.argsort(values)
    values, rates = values[order], rates[order]
    if not values[0] <= value <= values[-1]:
        return float("nan")
    return float(np.exp(np.interp(value, values, rates)))
