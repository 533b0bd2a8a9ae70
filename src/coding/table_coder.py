"""rANS coding of integer symbols, each under one of a fixed set of probability tables.

CompressAI's `RansEncoder.encode_with_indexes` codes symbol i with CDF table `indexes[i]`; this
wraps it for any family that can name a small set of discrete distributions once (a discretized
logistic at quantised means, a per-channel histogram, ...) and then picks one per symbol.
"""

from __future__ import annotations

import torch
from compressai import ans
from compressai._CXX import pmf_to_quantized_cdf
from torch import Tensor

from src.coding.container import BitstreamError

PRECISION = 16


class TableCoder:
    """Code symbols 0 .. L-1 under the rows of a (T, L) table of probabilities.

    Each row is quantised to a 16-bit CDF with one extra escape bin, as CompressAI does, so every
    symbol keeps a non-zero frequency and decoding is exact.
    """

    def __init__(self, pmfs: Tensor) -> None:
        if pmfs.dim() != 2 or pmfs.shape[1] < 1:
            raise ValueError(f"pmfs must be (tables, symbols), got {tuple(pmfs.shape)}")
        pmfs = pmfs.detach().to(torch.float64).clamp_min(0)
        self.num_symbols = int(pmfs.shape[1])
        tail = (1 - pmfs.sum(dim=1)).clamp_min(0)
        rows = torch.cat([pmfs, tail.unsqueeze(1)], dim=1).tolist()
        self.cdfs = [pmf_to_quantized_cdf(row, PRECISION) for row in rows]
        self.lengths = [len(c) for c in self.cdfs]
        self.offsets = [0] * len(self.cdfs)

    def encode(self, symbols: Tensor, indexes: Tensor) -> bytes:
        """rANS-code `symbols` (any shape, values 0 .. L-1) under the tables `indexes` names."""
        s = symbols.reshape(-1).to(torch.int32)
        if len(s) and (int(s.min()) < 0 or int(s.max()) >= self.num_symbols):
            raise ValueError(f"symbols must lie in 0..{self.num_symbols - 1}")
        encoder = ans.RansEncoder()
        return encoder.encode_with_indexes(
            s.tolist(),
            indexes.reshape(-1).to(torch.int32).tolist(),
            self.cdfs,
            self.lengths,
            self.offsets,
        )

    def decode(self, data: bytes, indexes: Tensor) -> Tensor:
        """Decode as many symbols as `indexes` holds; shaped like it. Out-of-range symbols from a
        corrupt stream raise `BitstreamError`."""
        decoder = ans.RansDecoder()
        values = decoder.decode_with_indexes(
            data,
            indexes.reshape(-1).to(torch.int32).tolist(),
            self.cdfs,
            self.lengths,
            self.offsets,
        )
        out = torch.tensor(values, dtype=torch.int64).view(indexes.shape)
        if out.numel() and (int(out.min()) < 0 or int(out.max()) >= self.num_symbols):
            raise BitstreamError("corrupt symbol stream: a symbol outside its table")
        return out
