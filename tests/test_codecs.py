"""The codec contract on every CompressAI architecture, at tiny widths."""

from __future__ import annotations

import pytest
import torch

from src.codecs.base import Codec, crop_to, pad_to_multiple
from src.codecs.compressai_zoo import ARCHITECTURES, CompressAICodec
from src.evaluation.metrics import psnr, quantize_8bit

ARCHS = [a for a in ARCHITECTURES if "relu" not in a]
AUTOREGRESSIVE = {"mbt2018", "cheng2020-anchor", "cheng2020-attn"}


def tiny(arch: str) -> CompressAICodec:
    torch.manual_seed(0)
    return CompressAICodec(arch, quality=1, N=8, M=8)


def test_padding_round_trip():
    x = torch.rand(2, 3, 37, 70)
    padded, _ = pad_to_multiple(x, 16)
    assert padded.shape[-2:] == (48, 80)
    assert torch.equal(crop_to(padded, (37, 70)), x)


@pytest.mark.parametrize("arch", ARCHS)
def test_forward_counts_bits_per_image_and_keeps_the_size(arch):
    codec = tiny(arch)
    x = torch.rand(2, 3, 40, 72)
    out = codec(x)
    assert out.x_hat.shape == x.shape
    assert set(out.bits) >= {"y"}
    for bits in out.bits.values():
        assert bits.shape == (2,) and bool((bits > 0).all())
    out.total_bits().sum().backward()
    assert any(p.grad is not None for p in codec.parameters())


@pytest.mark.parametrize("arch", ARCHS)
def test_compress_decompress_matches_the_quantised_forward(arch):
    codec = tiny(arch).eval()
    codec.prepare_for_coding()
    x = torch.rand(1, 3, 45, 67)
    encoded = codec.compress(x)
    assert encoded.image_size == (45, 67)
    assert encoded.num_bytes() > 0
    x_hat = codec.decompress(encoded)
    assert x_hat.shape == x.shape
    with torch.no_grad():
        expected = codec(x).x_hat
    if arch in AUTOREGRESSIVE:
        # Their parallel forward rounds y, the sequential coder rounds y - mean: close, not equal.
        assert float(psnr(x_hat, expected.clamp(0, 1))) > 35
    else:
        assert (quantize_8bit(x_hat) - quantize_8bit(expected)).abs().max() <= 1.5 / 255


def test_prepared_state_loads_into_a_fresh_codec():
    """CompressAI #75/#113: CDF buffers change size once built; a fresh codec must take them."""
    codec = tiny("bmshj2018-hyperprior").eval()
    codec.prepare_for_coding()
    x = torch.rand(1, 3, 64, 64)
    encoded = codec.compress(x)
    fresh = tiny("bmshj2018-hyperprior")
    torch.manual_seed(1)
    fresh.load_state_dict(codec.state_dict())
    fresh.eval()
    assert torch.equal(fresh.decompress(encoded), codec.decompress(encoded))


def test_parameter_groups_are_disjoint_and_named():
    codec = tiny("bmshj2018-hyperprior")
    aux = {id(p) for p in codec.aux_parameters()}
    entropy = {id(p) for p in codec.entropy_parameters()}
    assert aux and entropy and not aux & entropy
    assert isinstance(codec, Codec) and codec.stride == 64


def test_unknown_architecture_and_quality_are_refused():
    with pytest.raises(ValueError, match="unknown CompressAI architecture"):
        CompressAICodec("bmshj2019")
    with pytest.raises(ValueError, match="qualities"):
        CompressAICodec("cheng2020-anchor", quality=8)
