"""Compress and decompress image files with a trained codec, and inspect coded files.

    python -m src.cli compress   --ckpt RUN/checkpoints/best.ckpt in.png out.lic [--tile 1024]
    python -m src.cli decompress --ckpt RUN/checkpoints/best.ckpt out.lic rec.png [--max-pixels N]
    python -m src.cli export RUN/checkpoints/best.ckpt model.codec
    python -m src.cli compress   --ckpt model.codec in.png out.lic
    python -m src.cli inspect out.lic
    python -m src.cli cut out.lic first3.lic --levels 3   # progressive codecs: the first 3 groups
    python -m src.cli import compressai bmshj2018-hyperprior-1-7eb97409.pth.tar out.ckpt \
        --arch bmshj2018-hyperprior --quality 1       # the authors' released weights as our checkpoint

The same as the console script `lic compress|decompress|export|inspect ...`.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

import torch
import yaml
from PIL import Image

from src.api import Rate, compress_file, decompress_file, export_codec, load_codec
from src.codecs.base import Codec
from src.codecs.importing import discover_formats, import_weights
from src.coding.container import MAX_PIXELS, keep_first_streams, unpack
from src.errors import LicError
from src.utils.cli import run_command


def parse_options(pairs: list[str] | None) -> dict[str, Any]:
    """`KEY=VALUE` strings as keyword arguments; values are read as YAML (numbers, bools)."""
    options = {}
    for pair in pairs or []:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise LicError(f"--option takes KEY=VALUE, got {pair!r}")
        options[key] = yaml.safe_load(value)
    return options


def _load(args: argparse.Namespace) -> Codec:
    codec = load_codec(args.ckpt, device=args.device)
    codec.set_coding_options(**parse_options(args.option))
    return codec


def _compress(args: argparse.Namespace) -> None:
    with Image.open(args.input) as img:
        if img.mode != "RGB":
            print(
                f"note: {args.input} is {img.mode}; coded as RGB (alpha composited on white)",
                file=sys.stderr,
            )
    codec = _load(args)
    rate = None
    if args.rate_index is not None and args.factor is not None:
        raise LicError("give --rate-index or --factor, not both")
    if args.rate_index is not None:
        rate = Rate.index(args.rate_index)
    elif args.factor is not None:
        rate = Rate.factor(args.factor)
    data = compress_file(codec, args.input, args.output, rate, args.tile, args.levels)
    h, w = unpack(data).image_size
    print(f"{args.output}: {len(data)} bytes, {8 * len(data) / (h * w):.4f} bpp ({w}x{h})")


def _decompress(args: argparse.Namespace) -> None:
    codec = _load(args)
    w, h = decompress_file(codec, args.input, args.output, args.levels, args.max_pixels)
    print(f"{args.output}: {w}x{h}")


def _export(args: argparse.Namespace) -> None:
    codec = load_codec(args.ckpt)
    path = export_codec(codec, args.output)
    size = path.stat().st_size
    print(f"{path}: {codec.name}, {size / 1e6:.2f} MB, fingerprint {codec.fingerprint().hex()}")


def _cut(args: argparse.Namespace) -> None:
    data = keep_first_streams(Path(args.input).read_bytes(), args.levels)
    Path(args.output).write_bytes(data)
    h, w = unpack(data).image_size
    print(
        f"{args.output}: {len(data)} bytes, {8 * len(data) / (h * w):.4f} bpp, first {args.levels}"
    )


def _inspect(args: argparse.Namespace) -> None:
    data = Path(args.input).read_bytes()
    c = unpack(data)
    h, w = c.image_size
    print(f"codec:        {c.codec_name}")
    print(f"fingerprint:  {c.fingerprint.hex()}")
    print(f"image:        {w}x{h}")
    print(f"latent shape: {c.latent_shape}")
    if c.tile:
        rows, cols = c.tile_grid()
        print(f"tiles:        {rows}x{cols} of {c.tile} px")
    print(f"rate:         {c.rate if c.rate is not None else 'fixed'}")
    print(f"coding order: {c.order}")
    print(f"streams:      {', '.join(str(len(s)) for s in c.streams)} bytes")
    print(f"file:         {len(data)} bytes, {8 * len(data) / (h * w):.4f} bpp")


def _import(args: argparse.Namespace) -> None:
    codec, path = import_weights(
        args.format,
        args.source,
        args.output,
        arch=args.arch,
        quality=args.quality,
        metric=args.metric,
        options=parse_options(args.option),
    )
    params = sum(p.numel() for p in codec.parameters())
    print(f"{path}: {codec.name}, {params:,} parameters, from {args.format} file {args.source}")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="lic", description="Code images with a trained codec.")
    sub = parser.add_subparsers(dest="command", required=True)
    for name, fn, help_ in (
        ("compress", _compress, "image file -> coded file"),
        ("decompress", _decompress, "coded file -> PNG"),
    ):
        p = sub.add_parser(name, help=help_)
        p.add_argument("--ckpt", required=True, help="training checkpoint or exported .codec file")
        p.add_argument("--device", default="cpu")
        p.add_argument(
            "--option",
            action="append",
            metavar="KEY=VALUE",
            help="a coding option of the codec, e.g. --option n_beams=20 (repeatable)",
        )
        p.add_argument("input")
        p.add_argument("output")
        p.set_defaults(fn=fn)
        if name == "compress":
            p.add_argument("--rate-index", type=int, help="variable-rate codecs: a trained rate")
            p.add_argument("--factor", type=float, help="variable-rate codecs: a continuous rate")
            p.add_argument(
                "--tile", type=int, help="code images larger than TILE x TILE tile by tile"
            )
            p.add_argument("--levels", type=int, help="progressive codecs: write k latent groups")
        else:
            p.add_argument("--levels", type=int, help="progressive codecs: decode k latent groups")
            p.add_argument(
                "--max-pixels",
                type=int,
                default=MAX_PIXELS,
                help=f"refuse files that claim more pixels (default {MAX_PIXELS})",
            )
    p = sub.add_parser("export", help="checkpoint -> self-contained inference file")
    p.add_argument("ckpt", help="training checkpoint of the codec")
    p.add_argument("output", help="the .codec file to write (safetensors + JSON, no pickle)")
    p.set_defaults(fn=_export)
    formats = discover_formats()
    p = sub.add_parser(
        "import",
        help="the authors' released weights -> a checkpoint of ours",
        description="Formats: "
        + "; ".join(f"{f.name} ({f.help or f.published_at})" for f in formats.values()),
    )
    p.add_argument("format", choices=sorted(formats), help="the release's format")
    p.add_argument("source", help="the released file (a local path; nothing is downloaded)")
    p.add_argument("output", help="the checkpoint to write (.ckpt)")
    p.add_argument("--arch", help="the architecture the file holds, where the file does not say")
    p.add_argument("--quality", type=int, help="the quality level the file was trained for")
    p.add_argument("--metric", default="mse", choices=("mse", "ms-ssim"))
    p.add_argument("--option", action="append", metavar="KEY=VALUE", help="format-specific")
    p.set_defaults(fn=_import)
    p = sub.add_parser("cut", help="a coded file cut to its first latent groups (progressive)")
    p.add_argument("input")
    p.add_argument("output")
    p.add_argument("--levels", type=int, required=True, help="latent groups to keep")
    p.set_defaults(fn=_cut)
    p = sub.add_parser("inspect", help="print a coded file's header")
    p.add_argument("input")
    p.set_defaults(fn=_inspect)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return run_command(torch.no_grad()(lambda: args.fn(args)))


if __name__ == "__main__":
    sys.exit(main())
