"""Wavefront coding of the 5×5 context models: the order, equality with raster, portability."""

from __future__ import annotations

import struct
import subprocess
import sys
import zlib

import pytest
import torch

from src.codecs.compressai_zoo import CompressAICodec
from src.codecs.context_model import KERNEL, wavefront_order, wavefronts
from src.codecs.qvrf import QvrfCodec
from src.coding.container import BitstreamError, Rate, pack, unpack
from src.errors import LicError
from tests.helpers import REPO

pytestmark = pytest.mark.usefixtures("one_thread")
AUTOREGRESSIVE = ("mbt2018", "cheng2020-anchor", "cheng2020-attn")


def tiny(arch: str, seed: int = 0) -> CompressAICodec:
    torch.manual_seed(seed)
    codec = CompressAICodec(arch, 1, N=8, M=12).eval()
    codec.prepare_for_coding()
    return codec


def photo_like(h: int = 72, w: int = 104) -> torch.Tensor:
    """A smooth image with edges (more context to predict than noise)."""
    g = torch.Generator().manual_seed(3)
    base = torch.rand(1, 3, h // 8, w // 8, generator=g)
    return torch.nn.functional.interpolate(base, size=(h, w), mode="bilinear").clamp(0, 1)


@pytest.mark.parametrize(("h", "w"), [(1, 1), (1, 7), (6, 1), (5, 9), (9, 4)])
def test_wavefronts_visit_each_position_once_after_its_context(h, w):
    order = wavefront_order(h, w).tolist()
    assert sorted(order) == list(range(h * w))
    step = {}
    for t, (rows, cols) in enumerate(wavefronts(h, w)):
        for i, j in zip(rows.tolist(), cols.tolist()):
            step[(i, j)] = t
    if w >= 3:  # narrower latents skip the empty wavefronts
        assert len(wavefronts(h, w)) == (w - 1) + 3 * (h - 1) + 1
    reach = KERNEL // 2
    for (i, j), t in step.items():  # every causal tap of the type-A mask comes earlier
        causal = [(i - di, j + dj) for di in range(1, reach + 1) for dj in range(-reach, reach + 1)]
        causal += [(i, j - dj) for dj in range(1, reach + 1)]
        assert all(step[p] < t for p in causal if p in step)


@pytest.mark.parametrize("arch", AUTOREGRESSIVE)
def test_wavefront_decodes_what_raster_decodes(arch):
    codec = tiny(arch)
    x = photo_like()
    assert codec.coding_order == "wavefront"  # the default for context models
    wave = codec.compress_to_bytes(x)
    assert unpack(wave).order == "wavefront"
    codec.set_coding_options(coding_order="raster")
    raster = codec.compress_to_bytes(x)
    assert unpack(raster).order == "raster"
    x_raster = codec.decompress_bytes(raster)
    codec.set_coding_options(coding_order="wavefront")
    x_wave = codec.decompress_bytes(wave)
    torch.testing.assert_close(x_wave, x_raster, atol=1e-5, rtol=0)
    assert abs(len(wave) - len(raster)) <= 2  # the same symbols, in another order
    # the order travels in the file: either codec setting decodes either file
    assert torch.equal(codec.decompress_bytes(raster), x_raster)
    assert codec.coding_order == "wavefront"  # decoding left the codec's own order alone


def test_raster_order_is_compressai_byte_for_byte():
    codec = tiny("mbt2018")
    codec.set_coding_options(coding_order="raster")
    x = photo_like(64, 128)  # a multiple of the stride: CompressAI's compress does not pad
    reference = codec.net.compress(x)["strings"]
    assert codec.compress(x).streams == [reference[0][0], reference[1][0]]


def test_qvrf_on_a_context_model_codes_wavefronts_at_every_rate():
    torch.manual_seed(0)
    codec = QvrfCodec("mbt2018", 1, N=8, M=12).eval()
    codec.prepare_for_coding()
    x = photo_like()
    for rate in (Rate.index(0), Rate.index(5), Rate.factor(2.5)):
        data = codec.compress_to_bytes(x, rate)
        assert unpack(data).order == "wavefront"
        forward = codec(x).x_hat.clamp(0, 1)  # test mode walks the same wavefronts
        torch.testing.assert_close(codec.decompress_bytes(data), forward, atol=1e-6, rtol=0)
        codec.set_coding_options(coding_order="raster")
        torch.testing.assert_close(
            codec.decompress_bytes(codec.compress_to_bytes(x, rate)),
            codec.decompress_bytes(data),
            atol=1e-5,
            rtol=0,
        )
        codec.set_coding_options(coding_order="wavefront")


def test_orders_are_refused_where_they_do_not_apply():
    hyperprior = tiny("bmshj2018-hyperprior")
    with pytest.raises(LicError, match="raster order, not 'wavefront'"):
        hyperprior.set_coding_options(coding_order="wavefront")
    data = tiny("mbt2018").compress_to_bytes(photo_like())
    foreign = unpack(data)
    foreign.order = "wavefront"
    foreign.codec_name, foreign.fingerprint = hyperprior.name, hyperprior.fingerprint()
    with pytest.raises(BitstreamError, match="wavefront order"):
        hyperprior.decompress_bytes(pack(foreign))


DECODE_ON_TWO_THREADS = """
import sys, torch
from tests.test_wavefront import tiny
torch.set_num_threads(2)
codec = tiny("cheng2020-attn")
torch.save(codec.decompress_bytes(open(sys.argv[1], "rb").read()), sys.argv[2])
"""


def test_a_file_encoded_on_one_thread_decodes_on_two(tmp_path):
    assert torch.get_num_threads() == 1
    codec = tiny("cheng2020-attn")
    data = codec.compress_to_bytes(photo_like(96, 128))
    (tmp_path / "f.lic").write_bytes(data)
    subprocess.run(
        [
            sys.executable,
            "-c",
            DECODE_ON_TWO_THREADS,
            str(tmp_path / "f.lic"),
            str(tmp_path / "x.pt"),
        ],
        cwd=REPO,
        check=True,
        timeout=300,
    )
    # a desynchronised context model decodes garbage; threads only move the last float bits
    one = codec.decompress_bytes(data)
    torch.testing.assert_close(torch.load(tmp_path / "x.pt"), one, atol=1e-5, rtol=0)
    codec.set_coding_options(coding_order="raster")
    raster = codec.decompress_bytes(codec.compress_to_bytes(photo_like(96, 128)))
    torch.testing.assert_close(one, raster, atol=1e-5, rtol=0)


def test_version_2_files_still_read_as_raster():
    codec = tiny("bmshj2018-hyperprior")
    container = unpack(codec.compress_to_bytes(photo_like()))
    body = pack(container)[:-4]
    # version 2 had no order byte: it sat right before the stream count
    order_at = body.index(
        struct.pack("<I", 0) + b"\x00" + struct.pack("<H", len(container.streams))
    )
    v2 = bytearray(body[: order_at + 4] + body[order_at + 5 :])
    v2[4] = 2
    v2 += struct.pack("<I", zlib.crc32(bytes(v2)))
    old = unpack(bytes(v2))
    assert old.order == "raster" and old.streams == container.streams
    torch.testing.assert_close(
        codec.decompress_bytes(bytes(v2)), codec.decompress_bytes(pack(container))
    )
