"""The container format: round trips, and every kind of damage ends in BitstreamError."""

from __future__ import annotations

import random

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from src.codecs.compressai_zoo import CompressAICodec
from src.coding.container import BitstreamError, Container, Rate, pack, unpack
from src.errors import LicError

EXAMPLE = Container("bmshj2018-hyperprior", b"\x01" * 8, (300, 451), (5, 8), [b"abc" * 20, b"z"])


def test_pack_unpack_round_trip():
    assert unpack(pack(EXAMPLE)) == EXAMPLE


@pytest.mark.parametrize("rate", [Rate.index(3), Rate.factor(2.718281828), None])
def test_rate_setting_travels_in_the_header(rate):
    container = Container("qvrf", b"\x02" * 8, (64, 48), (4, 3), [b"x"], rate)
    assert unpack(pack(container)).rate == rate


def test_fixed_rate_codec_refuses_a_rate_setting():
    codec = CompressAICodec("bmshj2018-factorized", N=8, M=8).eval()
    codec.prepare_for_coding()
    with pytest.raises(LicError, match="single rate"):
        codec.compress_to_bytes(torch.rand(1, 3, 32, 32), Rate.index(1))


def test_every_truncation_is_refused():
    data = pack(EXAMPLE)
    for n in range(len(data)):
        with pytest.raises(BitstreamError):
            unpack(data[:n])


def test_every_single_byte_flip_is_refused():
    data = bytearray(pack(EXAMPLE))
    for i in range(len(data)):
        damaged = bytearray(data)
        damaged[i] ^= 0x40
        with pytest.raises(BitstreamError):
            unpack(bytes(damaged))


@settings(max_examples=2000, deadline=None)
@given(st.binary(max_size=200), st.integers(min_value=0, max_value=10**6))
def test_random_mutations_never_crash(noise, seed):
    rng = random.Random(seed)
    data = bytearray(pack(EXAMPLE))
    for _ in range(rng.randint(1, 4)):
        op = rng.choice(("flip", "cut", "insert"))
        if op == "flip" and data:
            data[rng.randrange(len(data))] = rng.randrange(256)
        elif op == "cut" and data:
            del data[rng.randrange(len(data)) :]
        else:
            pos = rng.randrange(len(data) + 1)
            data[pos:pos] = noise[:16]
    try:
        assert unpack(bytes(data)) is not None
    except BitstreamError:
        pass


@pytest.fixture(scope="module")
def codec() -> CompressAICodec:
    torch.manual_seed(0)
    codec = CompressAICodec("bmshj2018-hyperprior", quality=1, N=8, M=8).eval()
    codec.prepare_for_coding()
    return codec


def test_codec_file_round_trip_and_wrong_model(codec):
    x = torch.rand(1, 3, 45, 70)
    data = codec.compress_to_bytes(x)
    assert torch.equal(codec.decompress_bytes(data), codec.decompress(codec.compress(x)))
    torch.manual_seed(1)
    other = CompressAICodec("bmshj2018-hyperprior", quality=1, N=8, M=8).eval()
    other.prepare_for_coding()
    with pytest.raises(BitstreamError, match="another bmshj2018-hyperprior model"):
        other.decompress_bytes(data)
    factorized = CompressAICodec("bmshj2018-factorized", quality=1, N=8, M=8).eval()
    with pytest.raises(BitstreamError, match="written by a bmshj2018-hyperprior codec"):
        factorized.decompress_bytes(data)


def test_fingerprint_follows_the_weights(codec):
    before = codec.fingerprint()
    assert codec.fingerprint() == before  # cached, and stable
    param = next(codec.parameters())
    original = param.detach().clone()
    with torch.no_grad():
        param.add_(1.0)
    changed = codec.fingerprint()
    with torch.no_grad():
        param.copy_(original)
    assert changed != before
    assert codec.fingerprint() == before


def test_tiled_file_decodes_tile_by_tile(codec):
    torch.manual_seed(3)
    x = torch.rand(1, 3, 100, 150)
    data = codec.compress_to_bytes(x, tile=64)
    assert unpack(data).tile == 64 and len(unpack(data).streams) == 2 * 3
    x_hat = codec.decompress_bytes(data)
    assert x_hat.shape == x.shape
    # Every tile equals the tile coded on its own.
    corner = codec.decompress(codec.compress(x[..., 64:, 128:]))
    assert torch.equal(x_hat[..., 64:, 128:], corner)
    with pytest.raises(LicError, match="multiple of"):
        codec.compress_to_bytes(x, tile=50)


def test_tiled_file_with_a_missing_tile_is_refused(codec):
    data = codec.compress_to_bytes(torch.rand(1, 3, 80, 80), tile=64)
    container = unpack(data)
    container.streams.pop()
    with pytest.raises(BitstreamError, match="tiles where"):
        unpack(pack(container))


def test_damaged_tile_record_is_refused_before_decoding(codec):
    container = unpack(codec.compress_to_bytes(torch.rand(1, 3, 80, 80), tile=64))
    for bad in (b"\x09", b"\x01\x05\x00\x00\x00\x01\x00\xff\xff\xff\xff", b""):
        container.streams[-1] = bad
        with pytest.raises(BitstreamError):
            codec.decompress_bytes(pack(container))
