"""Entropy coding of integer symbols under a fixed set of categorical distributions.

Any family whose latents are indices into finite alphabets (vector-quantised codes, discrete
hyperlatents, mixture components) can code them here: give one probability table per context,
then code each symbol with the index of its table. The tables are quantised to integer
frequencies summing to 2^16, the precision of CompressAI's rANS coder, and coded with
`compressai.ans.RansEncoder.encode_with_indexes`.

Table layout for the rANS coder: a table for n symbols has n + 1 frequencies, the last one (the
coder's escape symbol, never used here) with frequency 1, hence n + 2 CDF entries and offset 0.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from compressai.ans import RansEncoder
from torch import Tensor

from src.coding.container import BitstreamError
from src.coding.rans import BoundedRansDecoder

PRECISION = 16


def quantize_pmf(probs: Tensor, precision: int = PRECISION, *, check: bool = True) -> Tensor:
    """Integer frequencies (..., n), each ≥ 1, summing to 2^precision − 1 along the last dim.

    Every symbol keeps a non-zero frequency (so any symbol can be coded), the rest of the mass
    follows `probs` by largest remainders. The one count left out of 2^precision is the rANS
    escape symbol's. Vectorised over leading dimensions, deterministic, and cheap enough to call
    every training step (the codec's bit counts use the very tables it codes with). `check=False`
    skips the finite/positive-mass check, a device-to-host sync, for callers whose tables are
    positive by construction (a frequency EMA on the training hot path).
    """
    n = probs.shape[-1]
    total = (1 << precision) - 1
    if n > total:
        raise ValueError(f"{n} symbols do not fit a {precision}-bit table")
    p = probs.detach().double().clamp_min(0)
    sums = p.sum(dim=-1, keepdim=True)
    if check and (not bool(torch.isfinite(sums).all()) or bool((sums <= 0).any())):
        raise ValueError("every probability table needs a finite, positive total mass")
    share = p / sums * (total - n)
    freqs = share.floor()
    left = (total - n - freqs.sum(dim=-1)).long()  # in 0..n-1
    order = (share - freqs).argsort(dim=-1, descending=True, stable=True)
    ranks = torch.empty_like(order).scatter_(-1, order, torch.arange(n).expand_as(order))
    freqs = freqs.long() + 1 + (ranks < left.unsqueeze(-1)).long()
    return freqs


def log2_probabilities(freqs: Tensor, precision: int = PRECISION) -> Tensor:
    """log2 of the probabilities the coder uses for frequencies from `quantize_pmf`."""
    return torch.log2(freqs.double()).float() - precision


class CategoricalCoder:
    """rANS coding of integer symbols, each under one of a set of categorical tables.

    Args:
        frequencies: one integer table per context, as `quantize_pmf` makes them (each entry
            ≥ 1, summing to 2^precision − 1); tables may differ in length.
        precision: bits of the quantised tables (CompressAI's coder works at 16).
    """

    def __init__(self, frequencies: Sequence[Tensor], precision: int = PRECISION) -> None:
        frequencies = list(frequencies)
        if not frequencies:
            raise ValueError("CategoricalCoder needs at least one table")
        total = (1 << precision) - 1
        for freqs in frequencies:
            if freqs.dim() != 1 or int(freqs.min()) < 1 or int(freqs.sum()) != total:
                raise ValueError(
                    f"each table must hold positive integer frequencies summing to {total} "
                    "(use CategoricalCoder.from_probabilities or quantize_pmf)"
                )
        self.precision = precision
        self.frequencies = [f.long().cpu() for f in frequencies]
        self.sizes = [int(f.numel()) for f in self.frequencies]
        self._cdfs = []
        for freqs in self.frequencies:
            with_escape = torch.cat([freqs, freqs.new_ones(1)])
            cdf = torch.cat([freqs.new_zeros(1), with_escape.cumsum(0)])
            self._cdfs.append(cdf.int().tolist())
        self._lengths = [n + 2 for n in self.sizes]
        self._offsets = [0] * len(self.sizes)

    @classmethod
    def from_probabilities(
        cls, tables: Tensor | Sequence[Tensor], precision: int = PRECISION
    ) -> CategoricalCoder:
        """A coder for probability tables: a (T, n) tensor, or a sequence of 1-D tensors."""
        tables = list(tables) if isinstance(tables, Sequence) else list(tables.unbind(0))
        return cls([quantize_pmf(t, precision) for t in tables], precision)

    def _check(self, symbols: Tensor, indexes: Tensor) -> tuple[Tensor, Tensor]:
        if symbols.shape != indexes.shape:
            raise ValueError(f"symbols {tuple(symbols.shape)} and indexes differ in shape")
        idx = indexes.flatten().long()
        if idx.numel() and (idx.min() < 0 or idx.max() >= len(self.sizes)):
            raise ValueError(f"table indexes must be in 0..{len(self.sizes) - 1}")
        sym = symbols.flatten().long()
        limits = torch.tensor(self.sizes)[idx]
        if sym.numel() and bool(((sym < 0) | (sym >= limits)).any()):
            raise ValueError("a symbol is outside its table's alphabet")
        return sym, idx

    def encode(self, symbols: Tensor, indexes: Tensor) -> bytes:
        """Code `symbols` (any shape), each under the table `indexes` names (same shape)."""
        sym, idx = self._check(symbols, indexes)
        return RansEncoder().encode_with_indexes(
            sym.tolist(), idx.tolist(), self._cdfs, self._lengths, self._offsets
        )

    def decode(self, data: bytes, indexes: Tensor) -> Tensor:
        """The symbols `encode` coded with these `indexes`, in their shape (int64)."""
        idx = indexes.flatten().long()
        values = BoundedRansDecoder().decode_with_indexes(
            data, idx.tolist(), self._cdfs, self._lengths, self._offsets
        )
        out = torch.tensor(values, dtype=torch.long)
        limits = torch.tensor(self.sizes)[idx]
        if out.numel() and bool(((out < 0) | (out >= limits)).any()):
            raise BitstreamError("corrupt stream: a decoded symbol is outside its alphabet")
        return out.reshape(indexes.shape)

    def ideal_bits(self, symbols: Tensor, indexes: Tensor) -> float:
        """−Σ log2 p of the symbols under the quantised tables (what rANS approaches)."""
        sym, idx = self._check(symbols, indexes)
        total = 0.0
        for i, freqs in enumerate(self.frequencies):
            chosen = sym[idx == i]
            total -= float(log2_probabilities(freqs, self.precision)[chosen].double().sum())
        return total
