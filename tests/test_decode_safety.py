"""Decoding validates before it decodes, and no file can crash a decoder.

Files that could crash the process are decoded in a child process, so a regression fails the
test instead of killing pytest.
"""

from __future__ import annotations

import subprocess
import sys
from dataclasses import replace

import pytest
import torch

from benchmarks.fuzz_decoders import FAMILIES, build_codec
from src.codecs.compressai_zoo import CompressAICodec
from src.codecs.export import export_codec
from src.coding.container import BitstreamError, Rate, pack, unpack

pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning")


@pytest.fixture(scope="module")
def hyperprior() -> CompressAICodec:
    torch.manual_seed(0)
    codec = CompressAICodec("bmshj2018-hyperprior", quality=1, N=8, M=8).eval()
    codec.prepare_for_coding()
    return codec


def _cli_decompress(tmp_path, codec, data: bytes, *extra: str) -> subprocess.CompletedProcess:
    model, coded = tmp_path / "tiny.codec", tmp_path / "crafted.lic"
    export_codec(codec, model)
    coded.write_bytes(data)
    cmd = [sys.executable, "-m", "src.cli", "decompress", "--ckpt", str(model), str(coded)]
    return subprocess.run(
        [*cmd, str(tmp_path / "out.png"), *extra], capture_output=True, text=True, timeout=300
    )


def test_crafted_latent_shape_is_refused_by_the_cli_not_a_segfault(tmp_path, hyperprior):
    """The issue's file: CRC-valid, latent shape disagreeing with its streams (was SIGSEGV)."""
    container = unpack(hyperprior.compress_to_bytes(torch.rand(1, 3, 64, 64)))
    crafted = pack(replace(container, latent_shape=(64, 64)))
    result = _cli_decompress(tmp_path, hyperprior, crafted)
    assert result.returncode == 2, result.stderr[-2000:]
    assert "latent shape field" in result.stderr and "(1, 1)" in result.stderr


def test_huge_claim_is_refused_by_max_pixels_before_decoding(tmp_path, hyperprior):
    """The issue's 4096 x 4096 file: a consistent but oversized claim."""
    container = unpack(hyperprior.compress_to_bytes(torch.rand(1, 3, 64, 64)))
    claim = pack(replace(container, image_size=(4096, 4096), latent_shape=(64, 64)))
    result = _cli_decompress(tmp_path, hyperprior, claim, "--max-pixels", str(2**20))
    assert result.returncode == 2 and "max_pixels=1048576" in result.stderr, result.stderr[-2000:]
    with pytest.raises(BitstreamError, match="image size field: 4096x4096"):
        hyperprior.decompress_bytes(claim, max_pixels=2**20)
    huge = pack(replace(container, image_size=(65536, 65536), latent_shape=(1024, 1024)))
    with pytest.raises(BitstreamError, match="more than max_pixels=134217728"):
        hyperprior.decompress_bytes(huge)  # the default, 2**27, shared with image files


_GARBAGE_DECODE = """
import sys, torch
from benchmarks.fuzz_decoders import build_codec
from src.codecs.base import Encoded
codec = build_codec(sys.argv[1])
codec.check_encoded = lambda *args, **kwargs: None  # below the field checks
h, w = (int(v) for v in sys.argv[2:4])
streams = [b"\\xff" * 3] * codec.num_streams
codec.decompress(Encoded(streams, (h, w), (h * codec.stride, w * codec.stride)))
print("decoded")
"""


@pytest.mark.parametrize(
    "name, shape",
    [
        ("bmshj2018-hyperprior", (64, 64)),
        ("mcquic", (64, 64)),
        ("mbt2018", (12, 12)),  # autoregressive: CompressAI's own RansDecoder
        ("qvrf-mbt2018", (12, 12)),
    ],
)
def test_entropy_decoders_stay_in_their_bytes_without_the_field_checks(name, shape):
    """Below the checks: streams far too short for their latents decode to garbage, no crash."""
    result = subprocess.run(
        [sys.executable, "-c", _GARBAGE_DECODE, name, *map(str, shape)],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode in (0, 1), result.stderr[-2000:]  # 1: a BitstreamError (McQuic)
    assert "decoded" in result.stdout or "BitstreamError" in result.stderr, result.stderr[-2000:]


@pytest.mark.parametrize("name", sorted(FAMILIES))
def test_every_family_refuses_fields_it_would_not_write(name):
    codec = build_codec(name)
    rate = FAMILIES[name].rates[-1]
    container = unpack(codec.compress_to_bytes(torch.rand(1, 3, 40, 70), rate))
    assert codec.decompress_bytes(pack(container)).shape == (1, 3, 40, 70)
    expected = codec.expected_latent_shape((40, 70))
    assert container.latent_shape == expected
    wrong_shapes = [(expected[0] + 1, expected[1]), expected[:1], (*expected, 1)]
    for shape in wrong_shapes:
        with pytest.raises(BitstreamError, match="latent shape field"):
            codec.decompress_bytes(pack(replace(container, latent_shape=shape)))
    counts = codec.stream_counts()
    for streams in ([*container.streams, b""], container.streams[: counts.start - 1]):
        with pytest.raises(BitstreamError, match="stream count field"):
            codec.decompress_bytes(pack(replace(container, streams=streams)))
    bad_rates = [Rate.index(0)] if rate is None else [None, Rate.index(99), Rate.factor(1e6)]
    for bad in bad_rates:
        with pytest.raises(BitstreamError, match="rate field"):
            codec.decompress_bytes(pack(replace(container, rate=bad)))
    resized = replace(container, image_size=(400, 700))  # its latent shape no longer fits
    with pytest.raises(BitstreamError, match="latent shape field"):
        codec.decompress_bytes(pack(resized))


def test_tiled_file_checks_its_tile_side_and_each_tile(hyperprior):
    container = unpack(hyperprior.compress_to_bytes(torch.rand(1, 3, 100, 150), tile=64))
    with pytest.raises(BitstreamError, match="tile field"):
        hyperprior.decompress_bytes(pack(replace(container, tile=32, image_size=(64, 96))))
    with pytest.raises(BitstreamError, match="max_pixels"):
        hyperprior.decompress_bytes(pack(container), max_pixels=100 * 149)
    assert hyperprior.decompress_bytes(pack(container), max_pixels=100 * 150).shape[-1] == 150


def test_evaluation_decodes_within_its_max_pixels(hyperprior):
    from src.evaluation.evaluate import evaluate_image

    x = torch.rand(1, 3, 32, 48)
    assert evaluate_image(hyperprior, x, "img", None, max_pixels=32 * 48).bpp > 0
    with pytest.raises(BitstreamError, match="max_pixels=1000"):
        evaluate_image(hyperprior, x, "img", None, max_pixels=1000)
