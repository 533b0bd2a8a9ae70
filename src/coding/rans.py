"""CompressAI's rANS decoder, handed only bytes it cannot read past.

`compressai.ans.RansDecoder` (C++, CompressAI 1.2.8 `cpp_exts/rans/rans_interface.cpp` over
ryg's `rans64.h`) reads 32-bit words from the stream with no bound check: a stream shorter than
its symbols need makes it read past the end of its buffer (the segmentation fault of a crafted
file). `BoundedRansDecoder` takes the same calls and hands the C++ decoder a copy of the stream
padded with as many words as it can possibly consume, so it never leaves its buffer.

How the C++ decoder reads (state x: 64 bits; L = 2^31; precision 16):

- `Rans64DecInit` reads 2 words.
- Each symbol: `Rans64DecAdvance` sets x = f·(x >> 16) + (x & 0xffff) − start and, if x < L,
  reads one word: x = (x << 32) | w. At most one word per symbol.
- When the symbol is the table's last (escape) entry, the value follows in bypass mode: 4-bit
  reads `Rans64DecGetBits` (x >>= 4, then one word when x < L), first a count read in nibbles
  until one is not 15 (c nibbles of 15), then as many value nibbles as the counts sum to
  (at most 15·c + 14). So g ≤ 16·c + 15 nibble reads for the symbol. An encoder never writes
  c > 0 (a 32-bit value has at most 8 nibbles); a garbage stream can.

The padding word is P = 0x80000000 (bytes 00 00 00 80). Nibble reads take x's low bits; a
refill puts the new word at the bottom, and one more refill comes at the latest 8 reads later,
so after a symbol's first refill every nibble it reads is an aligned nibble of a word. P's low
nibble is 0, so no padding nibble continues the count. Before that first refill the symbol reads
at most C nibbles of its state: after an escape's advance x < f_e · 2^48 (f_e the escape's
frequency), so C = ceil((48 + ceil(log2 f_e) − 31) / 4) ≤ 9 (5 for f_e = 1). A real word
gives at most 8 nibbles of 15, once, so over the whole stream Σc ≤ B·C + 8·W for B escapes and a
stream of W words. With P (top bit set) the refills of one symbol's nibble reads come at most 3
plus one per 8 reads. Every padding word read is one of: the 2 of the init, one per advance,
or one of those refills; summing, with B ≤ N symbols:

    padding words ≤ 2 + N + Σ (3 + ⌈g/8⌉) ≤ 2 + (7 + 2·C)·N + 16·W.

That is up to 100 bytes per symbol, so `decode_with_indexes` first decodes with the escape made
unreachable (each table gets one more, empty, entry, so the decoder never enters bypass mode
and reads at most 2 + N words). When no symbol came out as the escape, the real decoder takes
the very same steps, and decodes with a padding of 2 + N words; only a stream that does use the
escape gets the full padding. Table rows must start at 0 and hold 2^16 at their last
entry (then every search ends inside the row); indexes must name a table: both are checked.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

from compressai.ans import RansDecoder

from src.coding.container import BitstreamError

PRECISION = 16
PAD_WORD = b"\x00\x00\x00\x80"  # 0x80000000 little-endian: low nibble 0, top bit set
_TOP = 1 << PRECISION
ESCAPE_MARK = 1 << 30  # what the first pass decodes an escape to


def state_nibbles(max_escape_freq: int) -> int:
    """C: nibbles of the state an escape's bypass reads before its first refill (≤ 9)."""
    bits = 48 + math.ceil(math.log2(max(1, max_escape_freq)))
    return max(0, -(-(min(bits, 64) - 31) // 4))


def padding_words(num_symbols: int, num_bytes: int, max_escape_freq: int = _TOP) -> int:
    """Words of padding that provably cover every read of decoding `num_symbols` symbols from a
    stream of `num_bytes` bytes (see the module docstring); the default assumes any table."""
    words = -(-num_bytes // 4)
    return 2 + (7 + 2 * state_nibbles(max_escape_freq)) * num_symbols + 16 * words


def pad(stream: bytes, words: int) -> bytes:
    """`stream` with zero bytes to a word boundary, then `words` padding words."""
    return stream + b"\x00" * (-len(stream) % 4) + PAD_WORD * words


def _check_tables(
    cdfs: Sequence[Sequence[int]], sizes: Sequence[int], offsets: Sequence[int]
) -> int:
    """Refuse tables the decoder could search past; returns the largest escape frequency."""
    if not (len(cdfs) == len(sizes) == len(offsets)) or not cdfs:
        raise ValueError("rANS tables: cdfs, lengths and offsets must be non-empty and match")
    largest = 1
    for row, size in zip(cdfs, sizes):
        if not 2 <= size <= len(row) or row[0] != 0 or row[size - 1] != _TOP:
            raise ValueError("rANS table rows must run from 0 to 2^16 within their length")
        largest = max(largest, _TOP - row[size - 2])
    return largest


def _check_indexes(indexes: Sequence[int], tables: int) -> None:
    if indexes and (min(indexes) < 0 or max(indexes) >= tables):
        raise ValueError(f"rANS table indexes must be in 0..{tables - 1}")


class BoundedRansDecoder:
    """Drop-in for `compressai.ans.RansDecoder` that never reads past its stream.

    `set_stream` takes the most symbols the stream will be asked for (`max_symbols`) and
    `decode_stream` refuses to go beyond it, which is what makes the padding enough.
    """

    def __init__(self) -> None:
        self._decoder: RansDecoder | None = None
        self._left = 0

    def decode_with_indexes(
        self,
        encoded: bytes,
        indexes: Sequence[int],
        cdfs: Sequence[Sequence[int]],
        sizes: Sequence[int],
        offsets: Sequence[int],
    ) -> list[int]:
        """The symbols of `encoded`, each under the table `indexes` names (as CompressAI's)."""
        escape_freq = _check_tables(cdfs, sizes, offsets)
        _check_indexes(indexes, len(cdfs))
        n = len(indexes)
        # Pass 1: one more, empty, entry per table makes the escape an ordinary symbol, and these
        # offsets send it to exactly ESCAPE_MARK, every other symbol below it.
        wider = [list(row[:size]) + [_TOP] for row, size in zip(cdfs, sizes)]
        marks = [ESCAPE_MARK - (size - 2) for size in sizes]
        marked = RansDecoder().decode_with_indexes(
            pad(encoded, n + 2), indexes, wider, [size + 1 for size in sizes], marks
        )
        # Without an escape the real decoder takes the very same steps (n + 2 words at most).
        escapes = bool(marked) and max(marked) == ESCAPE_MARK
        words = padding_words(n, len(encoded), escape_freq) if escapes else n + 2
        return RansDecoder().decode_with_indexes(pad(encoded, words), indexes, cdfs, sizes, offsets)

    def set_stream(self, encoded: bytes, max_symbols: int) -> None:
        """Start decoding `encoded`, of which at most `max_symbols` symbols will be read."""
        self._decoder = RansDecoder()
        self._decoder.set_stream(pad(encoded, padding_words(max_symbols, len(encoded))))
        self._left = max_symbols

    def decode_stream(
        self,
        indexes: Sequence[int],
        cdfs: Sequence[Sequence[int]],
        sizes: Sequence[int],
        offsets: Sequence[int],
    ) -> list[int]:
        """The next `len(indexes)` symbols of the stream given to `set_stream`."""
        if self._decoder is None:
            raise ValueError("call set_stream before decode_stream")
        if len(indexes) > self._left:
            raise BitstreamError("corrupt stream: more symbols asked for than it was opened for")
        _check_tables(cdfs, sizes, offsets)
        _check_indexes(indexes, len(cdfs))
        self._left -= len(indexes)
        return self._decoder.decode_stream(indexes, cdfs, sizes, offsets)


def pad_for_decoding(stream: bytes, max_symbols: int) -> bytes:
    """A copy of `stream` that a plain `RansDecoder` may decode `max_symbols` symbols from
    (any tables): for decoders built where this module cannot reach, such as inside
    CompressAI's autoregressive models."""
    return pad(stream, padding_words(max_symbols, len(stream)))


def bound_entropy_coders(module) -> None:
    """Give every CompressAI entropy model inside `module` a `BoundedRansDecoder`.

    CompressAI's `EntropyBottleneck` and `GaussianConditional` decode through
    `entropy_coder._decoder.decode_with_indexes`; replacing that object per instance changes
    nothing else (encoding, state dicts). Idempotent.
    """
    from compressai.entropy_models import EntropyModel

    for sub in module.modules():
        if isinstance(sub, EntropyModel) and not isinstance(
            sub.entropy_coder._decoder, BoundedRansDecoder
        ):
            sub.entropy_coder._decoder = BoundedRansDecoder()
