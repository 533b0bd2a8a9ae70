"""McQuic's real coding against its raw bound, and its coding speed, on the sample photos.

Builds a paper-size McQuic (default: the released qp 2 setting, m=2, width 128, codebooks
[8192, 2048, 512]) or loads a checkpoint, codes every validation photo of the built-in sample set
into the framework's container and decodes it, and prints per image: the raw bits
m·Σ_l log2(k_l)·h_l·w_l of its (padded) code grid, the bits of the rANS streams, the whole file in
bpp, and the encode / decode times. Untrained, the frequency tables are uniform, so the streams
must sit on the raw bound: this checks the coder. A trained checkpoint shows the entropy-coding
gain of its learned frequencies.

    python benchmarks/mcquic_coding.py [--ckpt RUN/checkpoints/last.ckpt] [--m 2 --N 128] [--threads 2]
"""

from __future__ import annotations

import argparse
import math
import tempfile
import time
from pathlib import Path

import torch

from src.codecs.loading import load_codec
from src.codecs.mcquic import McQuic
from src.datamodules.images import decode_rgb, list_images
from src.datamodules.sample import gather_sample_photos


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ckpt", default=None)
    parser.add_argument("--m", type=int, default=2)
    parser.add_argument("--N", type=int, default=128)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    if args.ckpt:
        codec = load_codec(args.ckpt)
    else:
        codec = McQuic(m=args.m, N=args.N).eval()
        codec.prepare_for_coding()
    params = sum(p.numel() for p in codec.parameters())
    print(
        f"mcquic m={codec.m} N={codec.N} k={codec.codebook_sizes}: {params / 1e6:.2f} M parameters"
    )
    root = gather_sample_photos(Path(tempfile.gettempdir()) / "lic-sample")
    print("image            size      raw bits  stream bits  ratio   file bpp  enc s   dec s")
    for path in list_images(root / "val"):
        x = decode_rgb(path).float().div(255).unsqueeze(0)
        start = time.perf_counter()
        encoded = codec.compress(x)
        data = codec.pack(encoded)
        encode_time = time.perf_counter() - start
        start = time.perf_counter()
        codec.decompress_bytes(data)
        decode_time = time.perf_counter() - start
        h, w = encoded.latent_shape
        raw = sum(
            codec.m
            * math.log2(k)
            * (h * 2 ** (codec.levels - 1 - level))
            * (w * 2 ** (codec.levels - 1 - level))
            for level, k in enumerate(codec.codebook_sizes)
        )
        stream_bits = 8 * encoded.num_bytes()
        height, width = encoded.image_size
        print(
            f"{path.name[:16]:16} {width}x{height:<5} {raw:9.0f} {stream_bits:12d} {stream_bits / raw:6.4f}"
            f" {8 * len(data) / (height * width):9.4f} {encode_time:6.2f} {decode_time:6.2f}"
        )


if __name__ == "__main__":
    main()
