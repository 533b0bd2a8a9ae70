"""Real coding against CompressAI's own, per codec preset, on a 768×512 photo.

For each CompressAI preset (paper widths at `--quality`, weights from `--ckpt` if given, else
freshly initialised and prepared): the real file size over the likelihood estimate (target
<= 1.01), the framework's compress / decompress seconds (container, fingerprint, padding and CRC
included) over CompressAI's `compress` / `decompress` on the same network (target <= 1.05x,
best of `--repeats`), and the peak resident memory of a process that only codes that image.
For the context models (mbt2018, cheng2020) the framework codes in wavefront order by default;
they also get our raster order's seconds beside the wavefront's and the ratio (goal: Cheng 2020
decoding >= 5x faster than raster), each order's real/estimated bits.
`--huge 4000` also codes a 4000×4000 image in tiles of `--tile` and reports its peak memory.

    python benchmarks/coding.py [--quality 3] [--repeats 3] [--presets bmshj2018_hyperprior ...]
    python benchmarks/coding.py --presets bmshj2018_hyperprior --huge 4000 --tile 1024
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from src.codecs.base import pad_to_multiple  # noqa: E402
from src.codecs.compressai_zoo import CompressAICodec  # noqa: E402
from src.codecs.loading import load_codec  # noqa: E402
from src.datamodules.sample import gather_sample_photos  # noqa: E402
from src.evaluation.baselines import from_pil  # noqa: E402

PRESETS = {
    "bmshj2018_factorized": "bmshj2018-factorized",
    "bmshj2018_hyperprior": "bmshj2018-hyperprior",
    "mbt2018_mean": "mbt2018-mean",
    "mbt2018": "mbt2018",
    "cheng2020_anchor": "cheng2020-anchor",
    "cheng2020_attn": "cheng2020-attn",
}


def photo(width: int, height: int) -> torch.Tensor:
    """The largest built-in sample photo, resized (bicubic) to width × height, in [0, 1]."""
    root = gather_sample_photos(Path("data") / "sample")
    path = max(root.rglob("*.*"), key=lambda p: Image.open(p).size[0] * Image.open(p).size[1])
    with Image.open(path) as img:
        return from_pil(img.convert("RGB").resize((width, height), Image.BICUBIC))


def best_of(repeats: int, fn) -> tuple[float, object]:
    """The fastest of `repeats` calls of `fn` and its last result."""
    times, result = [], None
    for _ in range(repeats):
        start = time.perf_counter()
        result = fn()
        times.append(time.perf_counter() - start)
    return min(times), result


@torch.no_grad()
def measure(
    preset: str, quality: int, ckpt: str | None, repeats: int, huge: int, tile: int
) -> dict:
    """Every figure of one preset, in this process (run it alone for a clean peak memory)."""
    torch.manual_seed(0)
    if ckpt:
        codec = load_codec(ckpt)
    else:
        codec = CompressAICodec(PRESETS[preset], quality=quality).eval()
        codec.prepare_for_coding()
    if huge:
        x = torch.rand(1, 3, huge, huge)
        start = time.perf_counter()
        data = codec.compress_to_bytes(x, tile=tile)
        codec.decompress_bytes(data)
        seconds = time.perf_counter() - start
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        return {
            "preset": preset,
            "image": f"{huge}x{huge}",
            "tile": tile,
            "seconds": seconds,
            "peak_rss_mb": peak,
        }
    x = photo(768, 512)
    padded, _ = pad_to_multiple(x, codec.stride)
    ours_enc, data = best_of(repeats, lambda: codec.compress_to_bytes(x))
    ours_dec, _ = best_of(repeats, lambda: codec.decompress_bytes(data))
    ref_enc, ref = best_of(repeats, lambda: codec.net.compress(padded))
    ref_dec, _ = best_of(repeats, lambda: codec.net.decompress(ref["strings"], ref["shape"]))
    estimated = float(codec(x).total_bits().sum())
    row = {
        "preset": preset,
        "image": "768x512",
        "order": codec.coding_order,
        "bpp": 8 * len(data) / (768 * 512),
        "real_over_estimated": 8 * len(data) / estimated,
        "compress_s": ours_enc,
        "compress_vs_compressai": ours_enc / ref_enc,
        "decompress_s": ours_dec,
        "decompress_vs_compressai": ours_dec / ref_dec,
    }
    if "wavefront" in codec.coding_orders:
        codec.set_coding_options(coding_order="raster")
        raster_enc, raster = best_of(repeats, lambda: codec.compress_to_bytes(x))
        raster_dec, _ = best_of(repeats, lambda: codec.decompress_bytes(raster))
        row |= {
            "raster_compress_s": raster_enc,
            "raster_decompress_s": raster_dec,
            "raster_real_over_estimated": 8 * len(raster) / estimated,
            "wavefront_encode_speedup": raster_enc / ours_enc,
            "wavefront_decode_speedup": raster_dec / ours_dec,
        }
    return row | {"peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--presets", nargs="+", default=list(PRESETS), choices=list(PRESETS))
    parser.add_argument("--quality", type=int, default=3)
    parser.add_argument("--ckpt", help="a checkpoint to measure instead of fresh weights")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--huge", type=int, default=0, help="also code a HUGE×HUGE image, tiled")
    parser.add_argument("--tile", type=int, default=1024)
    parser.add_argument("--one", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.one:  # a child process: one preset, one JSON line
        result = measure(
            args.presets[0], args.quality, args.ckpt, args.repeats, args.huge, args.tile
        )
        print(json.dumps(result))
        return
    rows = []
    for preset in args.presets:
        for huge in [0] + ([args.huge] if args.huge else []):
            cmd = [
                sys.executable,
                __file__,
                "--one",
                "--presets",
                preset,
                "--quality",
                str(args.quality),
                "--repeats",
                str(args.repeats),
                "--huge",
                str(huge),
                "--tile",
                str(args.tile),
            ]
            cmd += ["--ckpt", args.ckpt] if args.ckpt else []
            cmd += ["--threads", str(args.threads)] if args.threads else []
            out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
            rows.append(json.loads(out.strip().splitlines()[-1]))
            print(json.dumps(rows[-1]), flush=True)
    print()
    print(
        f"{'preset':22} {'bpp':>7} {'real/est':>9} {'enc s':>7} {'enc x':>6} {'dec s':>7} "
        f"{'dec x':>6} {'peak MB':>8}"
    )
    for r in rows:
        if "bpp" in r:
            print(
                f"{r['preset']:22} {r['bpp']:7.3f} {r['real_over_estimated']:9.4f} "
                f"{r['compress_s']:7.3f} {r['compress_vs_compressai']:6.3f} "
                f"{r['decompress_s']:7.3f} {r['decompress_vs_compressai']:6.3f} "
                f"{r['peak_rss_mb']:8.0f}"
            )
        else:
            print(
                f"{r['preset']:22} {r['image']} in {r['tile']}-px tiles: {r['seconds']:.1f} s, "
                f"peak {r['peak_rss_mb']:.0f} MB"
            )
    waves = [r for r in rows if "raster_decompress_s" in r]
    if waves:
        print()
        print(
            f"{'context model':22} {'raster enc':>10} {'wave enc':>9} {'x':>6} "
            f"{'raster dec':>10} {'wave dec':>9} {'x':>6} {'real/est r':>10} {'real/est w':>10}"
        )
        for r in waves:
            print(
                f"{r['preset']:22} {r['raster_compress_s']:10.2f} {r['compress_s']:9.2f} "
                f"{r['wavefront_encode_speedup']:6.1f} {r['raster_decompress_s']:10.2f} "
                f"{r['decompress_s']:9.2f} {r['wavefront_decode_speedup']:6.1f} "
                f"{r['raster_real_over_estimated']:10.4f} {r['real_over_estimated']:10.4f}"
            )


if __name__ == "__main__":
    main()
