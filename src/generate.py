"""Generative uses of a trained hierarchical VAE codec (QRes-VAE), each writing a PNG grid.

    python -m src.generate sample      --ckpt CKPT --out samples.png [--n 8] [--size 256 256]
                                       [--temperature 0.5 1.0 ...] [--seed 0]
    python -m src.generate interpolate --ckpt CKPT --out interp.png A.png B.png [--steps 8]
                                       [--size 256 256]
    python -m src.generate inpaint     --ckpt CKPT --out inpaint.png IMAGE.png
                                       [--box 0.25 0.25 0.75 0.75] [--n 4] [--temperature 1.0]
                                       [--iterations 1] [--size 256 256] [--raw]

The same as the console script `lic-generate sample|interpolate|inpaint ...`. Sampling draws every
latent from its prior at a temperature (one grid row per temperature). Interpolation decodes
linear blends of the two images' quantised latents. Inpainting keeps the latents outside the box
(and every 1x1 latent) and redraws those inside it (repeat with --iterations to let the two agree
better); the grid shows the original, the masked input, then the samples: the original with the
box pasted in, or with --raw the decoded samples themselves.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

import torch
import torchvision.transforms.functional as TF
from torch import Tensor
from torchvision.utils import make_grid

from src.codecs.base import Codec
from src.codecs.loading import load_codec
from src.codecs.qres_vae import box_slices
from src.datamodules.images import decode_rgb
from src.errors import LicError
from src.evaluation.baselines import to_pil
from src.utils.cli import run_command


def load_generative(path: str, device: str) -> Codec:
    """The codec of a checkpoint, refused clearly unless it is a generative model."""
    codec = load_codec(path, device=device)
    if not (hasattr(codec, "generate") and hasattr(codec, "latents")):
        raise LicError(f"{codec.name} is not a generative model (QRes-VAE checkpoints are)")
    return codec


def load_image(path: str, size: Sequence[int] | None, stride: int) -> Tensor:
    """An image as (1, 3, H, W) in [0, 1]: resized and centre-cropped to `size`, or else
    centre-cropped down to multiples of `stride`."""
    x = decode_rgb(path).float().div(255).unsqueeze(0)
    if size is not None:
        x = TF.resize(x, max(size), antialias=True)
        return TF.center_crop(x, list(size)).clamp(0, 1)
    h, w = (x.shape[-2] // stride) * stride, (x.shape[-1] // stride) * stride
    if min(h, w) == 0:
        raise LicError(f"{path} is smaller than {stride} px; pass --size to resize it")
    return TF.center_crop(x, [h, w])


def save_grid(images: Tensor, nrow: int, path: str) -> None:
    """Save (N, 3, H, W) in [0, 1] as one PNG grid with `nrow` images per row."""
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    to_pil(make_grid(images.clamp(0, 1).cpu(), nrow=nrow, padding=2, pad_value=1.0)).save(path)
    print(f"{path}: {images.shape[0]} images of {images.shape[-1]}x{images.shape[-2]}")


def check_size(size: Sequence[int] | None, stride: int) -> None:
    if size is not None and any(s <= 0 or s % stride for s in size):
        raise LicError(f"--size must be positive multiples of {stride}, got {tuple(size)}")


def _sample(args: argparse.Namespace, codec: Codec) -> None:
    size = args.size or [256, 256]
    check_size(size, codec.stride)
    if args.n < 1 or any(t < 0 for t in args.temperature):
        raise LicError("--n must be positive and every --temperature at least 0")
    rows = [codec.generate(args.n, tuple(size), temperature=t) for t in args.temperature]
    save_grid(torch.cat(rows), args.n, args.out)


def _interpolate(args: argparse.Namespace, codec: Codec) -> None:
    check_size(args.size, codec.stride)
    if args.steps < 2:
        raise LicError(f"--steps must be at least 2, got {args.steps}")
    a = load_image(args.first, args.size, codec.stride).to(args.device)
    b = load_image(args.second, args.size, codec.stride).to(args.device)
    if a.shape != b.shape:
        h, w = min(a.shape[-2], b.shape[-2]), min(a.shape[-1], b.shape[-1])
        a, b = TF.center_crop(a, [h, w]), TF.center_crop(b, [h, w])
    za, zb = codec.latents(a), codec.latents(b)
    weights = torch.linspace(0, 1, args.steps, device=a.device).view(-1, 1, 1, 1)
    blends = [(1 - weights) * p + weights * q for p, q in zip(za, zb)]
    decoded = codec.generate(args.steps, tuple(a.shape[-2:]), blends, temperature=0.0)
    save_grid(torch.cat([a, decoded, b]), args.steps + 2, args.out)


def inpaint(
    codec: Codec,
    x: Tensor,
    box: Sequence[float],
    n: int = 1,
    iterations: int = 1,
    temperature: float = 1.0,
    raw: bool = False,
) -> tuple[Tensor, Tensor]:
    """Redraw the `box` (x1, y1, x2, y2 in fractions) of the image `x` (1, 3, H, W), `n` times.

    Each iteration encodes the current images, keeps their latents outside the box (and every
    1x1 latent) and decodes with the box's part redrawn from the prior; the box of the decoded
    sample then replaces the box of the input to the next iteration. Returns the masked input
    and the `n` results: the original with the box pasted in, or with `raw` the decoded samples
    themselves (what the reference returns)."""
    rows, cols = box_slices(box, *x.shape[-2:])
    masked = x.clone()
    masked[..., rows, cols] = 0.5
    current = masked.expand(n, -1, -1, -1).clone()
    for _ in range(iterations):
        sample = codec.generate(n, tuple(x.shape[-2:]), codec.latents(current), temperature, box)
        current[..., rows, cols] = sample[..., rows, cols]
    return masked, sample if raw else current


def _inpaint(args: argparse.Namespace, codec: Codec) -> None:
    check_size(args.size, codec.stride)
    x1, y1, x2, y2 = args.box
    if not (0 <= x1 < x2 <= 1 and 0 <= y1 < y2 <= 1):
        raise LicError(
            f"--box takes x1 y1 x2 y2 with 0 <= x1 < x2 <= 1, same for y, got {args.box}"
        )
    if args.n < 1 or args.iterations < 1 or args.temperature < 0:
        raise LicError("--n and --iterations must be positive, --temperature at least 0")
    x = load_image(args.image, args.size, codec.stride).to(args.device)
    masked, results = inpaint(
        codec, x, args.box, args.n, args.iterations, args.temperature, args.raw
    )
    save_grid(torch.cat([x, masked, results]), args.n + 2, args.out)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="lic-generate", description="Sample, interpolate and inpaint with a QRes-VAE."
    )
    sub = parser.add_subparsers(dest="command", required=True)
    commands = (
        ("sample", _sample, "unconditional samples at one or more temperatures"),
        ("interpolate", _interpolate, "decode blends of two images' latents"),
        ("inpaint", _inpaint, "redraw a box of an image"),
    )
    for name, fn, help_ in commands:
        p = sub.add_parser(name, help=help_)
        p.add_argument("--ckpt", required=True, help="training checkpoint of the codec")
        p.add_argument("--out", required=True, help="PNG grid to write")
        p.add_argument("--device", default="cpu")
        p.add_argument("--seed", type=int, default=0)
        p.add_argument("--size", type=int, nargs=2, metavar=("H", "W"), help="multiples of 64")
        p.set_defaults(fn=fn)
        if name == "sample":
            p.add_argument("--n", type=int, default=8, help="samples per temperature")
            p.add_argument("--temperature", type=float, nargs="+", default=[0.5, 1.0])
        elif name == "interpolate":
            p.add_argument("first")
            p.add_argument("second")
            p.add_argument("--steps", type=int, default=8, help="images from first to second")
        else:
            p.add_argument("image")
            p.add_argument("--box", type=float, nargs=4, default=[0.25, 0.25, 0.75, 0.75])
            p.add_argument("--n", type=int, default=4, help="inpainted samples")
            p.add_argument("--temperature", type=float, default=1.0)
            p.add_argument("--iterations", type=int, default=1)
            p.add_argument(
                "--raw",
                action="store_true",
                help="show the decoded samples themselves, not the original with the box pasted",
            )
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)

    @torch.no_grad()
    def generate() -> None:
        torch.manual_seed(args.seed)
        args.fn(args, load_generative(args.ckpt, args.device))

    return run_command(generate)


if __name__ == "__main__":
    sys.exit(main())
