"""The bounded rANS decoder: exact on real streams, never past its buffer on garbage.

A word-counting transcription of CompressAI 1.2.8's `RansDecoder::decode_with_indexes` (and
ryg's `rans64.h`) checks the padding bound of `src.coding.rans` read for read: on hostile
streams it must never need a word beyond the padded copy, and it must agree with the C++ decoder
wherever both run, so the transcription is the decoder's.
"""

from __future__ import annotations

import random
import struct

import pytest
from compressai.ans import RansDecoder, RansEncoder

from src.coding.container import BitstreamError
from src.coding.rans import BoundedRansDecoder, pad, padding_words

L, MASK16 = 1 << 31, (1 << 16) - 1


def _int32(v: int) -> int:
    v &= 0xFFFFFFFF
    return v - (1 << 32) if v >= 1 << 31 else v


class OutOfWords(Exception):
    """The decoder would read past the end of its buffer."""


def reference_decode(data: bytes, indexes, cdfs, sizes, offsets) -> tuple[list[int], int]:
    """CompressAI's decoder in Python: the symbols and the number of 32-bit words read."""
    words = struct.unpack(f"<{len(data) // 4}I", data[: len(data) // 4 * 4])
    pos = 0

    def word() -> int:
        nonlocal pos
        if pos >= len(words):
            raise OutOfWords
        pos += 1
        return words[pos - 1]

    x = word() | word() << 32
    out = []

    def get_bits() -> int:
        nonlocal x
        val = x & 15
        x >>= 4
        if x < L:
            x = ((x << 32) | word()) & (2**64 - 1)
        return val

    for i in indexes:
        cdf, max_value = cdfs[i], sizes[i] - 2
        cum = x & MASK16
        s = next(k for k in range(sizes[i]) if cdf[k] > cum) - 1
        x = (cdf[s + 1] - cdf[s]) * (x >> 16) + (x & MASK16) - cdf[s]
        if x < L:
            x = ((x << 32) | word()) & (2**64 - 1)
        value = s
        if value == max_value:
            val = get_bits()
            n_bypass = val
            while val == 15:
                val = get_bits()
                n_bypass += val
            raw = 0
            for j in range(n_bypass):  # int32 in C++; x86 masks shift counts to 5 bits
                raw |= (get_bits() << (j * 4 % 32)) & 0xFFFFFFFF
            raw = raw - (1 << 32) if raw >= 1 << 31 else raw
            value = -(raw >> 1) - 1 if raw & 1 else (raw >> 1) + max_value
        out.append(_int32(value + offsets[i]))
    return out, pos


def tables(rng: random.Random, count: int = 4, escape: int = 1) -> tuple[list, list, list]:
    """Random CompressAI-style tables: positive frequencies, the escape's frequency `escape`."""
    cdfs, sizes, offsets = [], [], []
    for _ in range(count):
        n = rng.randint(1, 12)
        cuts = [0, *sorted(rng.sample(range(1, (1 << 16) - escape), n - 1)), (1 << 16) - escape]
        freqs = [b - a for a, b in zip(cuts, cuts[1:])]
        cdf = [0]
        for f in [*freqs, escape]:
            cdf.append(cdf[-1] + f)
        cdfs.append(cdf + [0] * rng.randint(0, 3))  # rows padded like CompressAI's
        sizes.append(n + 2)
        offsets.append(rng.randint(-5, 0))
    return cdfs, sizes, offsets


HOSTILE = {
    "ones": lambda rng, n: b"\xff" * n,
    "zeros": lambda rng, n: b"\x00" * n,
    "random": lambda rng, n: rng.randbytes(n),
    "sparse": lambda rng, n: bytes(rng.choice((0, 0xFF, 0xF0, 0x0F)) for _ in range(n)),
}


@pytest.mark.parametrize("kind", sorted(HOSTILE))
@pytest.mark.parametrize("escape", [1, 300, 40000])
def test_padding_covers_every_read_of_a_garbage_stream(kind, escape):
    rng = random.Random(f"{kind}{escape}")
    for _ in range(40):
        cdfs, sizes, offsets = tables(rng, escape=escape)
        n = rng.choice((0, 1, 5, 40, 300))
        indexes = [rng.randrange(len(cdfs)) for _ in range(n)]
        stream = HOSTILE[kind](rng, rng.choice((0, 1, 3, 8, 13, 64, 257)))
        padded = pad(stream, padding_words(n, len(stream), escape))
        values, used = reference_decode(padded, indexes, cdfs, sizes, offsets)  # no OutOfWords
        assert used <= len(padded) // 4
        assert RansDecoder().decode_with_indexes(padded, indexes, cdfs, sizes, offsets) == values
        bounded = BoundedRansDecoder().decode_with_indexes(stream, indexes, cdfs, sizes, offsets)
        assert bounded == values


def test_an_unpadded_garbage_stream_would_read_past_its_end():
    """The reason for the padding: without it, the decoder runs out of bytes."""
    rng = random.Random(0)
    cdfs, sizes, offsets = tables(rng)
    with pytest.raises(OutOfWords):
        reference_decode(b"\xff" * 16, [0] * 200, cdfs, sizes, offsets)


def test_real_streams_decode_exactly_with_and_without_escapes():
    rng = random.Random(1)
    cdfs, sizes, offsets = tables(rng, count=6)
    for out_of_range in (False, True):
        indexes = [rng.randrange(6) for _ in range(2000)]
        symbols = [rng.randrange(sizes[i] - 2) + offsets[i] for i in indexes]
        if out_of_range:  # values beyond a table go through the escape's bypass coding
            for k in rng.sample(range(2000), 30):
                symbols[k] = rng.choice((-1000, 77, 2**20)) + offsets[indexes[k]]
        data = RansEncoder().encode_with_indexes(symbols, indexes, cdfs, sizes, offsets)
        assert BoundedRansDecoder().decode_with_indexes(data, indexes, cdfs, sizes, offsets) == (
            symbols
        )


def test_streaming_decoder_keeps_to_its_symbol_budget():
    rng = random.Random(2)
    cdfs, sizes, offsets = tables(rng)
    indexes = [rng.randrange(4) for _ in range(50)]
    symbols = [rng.randrange(sizes[i] - 2) + offsets[i] for i in indexes]
    data = RansEncoder().encode_with_indexes(symbols, indexes, cdfs, sizes, offsets)
    decoder = BoundedRansDecoder()
    decoder.set_stream(data, max_symbols=50)
    got = decoder.decode_stream(indexes[:30], cdfs, sizes, offsets)
    got += decoder.decode_stream(indexes[30:], cdfs, sizes, offsets)
    assert got == symbols
    with pytest.raises(BitstreamError, match="more symbols"):
        decoder.decode_stream(indexes[:1], cdfs, sizes, offsets)


def test_tables_and_indexes_the_decoder_could_search_past_are_refused():
    rng = random.Random(3)
    cdfs, sizes, offsets = tables(rng)
    with pytest.raises(ValueError, match="indexes"):
        BoundedRansDecoder().decode_with_indexes(b"", [len(cdfs)], cdfs, sizes, offsets)
    broken = [row[:] for row in cdfs]
    broken[0][sizes[0] - 1] = 1000  # no longer ends at 2^16
    with pytest.raises(ValueError, match="2\\^16"):
        BoundedRansDecoder().decode_with_indexes(b"", [0], broken, sizes, offsets)
