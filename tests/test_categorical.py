"""rANS coding of integer symbols under categorical tables (src/coding/categorical.py)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from compressai._CXX import pmf_to_quantized_cdf

from src.coding.categorical import CategoricalCoder, log2_probabilities, quantize_pmf
from src.coding.container import BitstreamError


def skewed_tables(n_tables: int, n: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    probs = torch.rand(n_tables, n, generator=g) ** 6
    probs[:, : n // 4] = 0  # symbols that never occur still get a codable frequency
    return probs / probs.sum(-1, keepdim=True)


def test_quantized_tables_are_valid_and_follow_the_probabilities():
    probs = skewed_tables(3, 512)
    freqs = quantize_pmf(probs)
    assert freqs.dtype == torch.long and freqs.shape == probs.shape
    assert (freqs >= 1).all() and (freqs.sum(-1) == 2**16 - 1).all()
    # Close to the ideal probabilities: the cross-entropy costs < 1 % over the entropy.
    entropy = -(probs * torch.log2(probs.clamp_min(1e-30))).sum(-1)
    cross = -(probs * log2_probabilities(freqs)).sum(-1)
    assert ((cross - entropy) / entropy).max() < 0.01
    # As good as CompressAI's own quantiser (its table has no escape slot, ours has one count).
    ref = np.diff(pmf_to_quantized_cdf(probs[0].tolist(), 16))
    ref_cross = -(probs[0].numpy() * (np.log2(np.maximum(ref, 1)) - 16)).sum()
    assert float(cross[0]) == pytest.approx(ref_cross, rel=2e-3)


def test_symbols_round_trip_under_mixed_tables_at_close_to_their_ideal_length():
    tables = [skewed_tables(1, 37, seed=1)[0], skewed_tables(1, 1000, seed=2)[0]]
    coder = CategoricalCoder.from_probabilities(tables)
    g = torch.Generator().manual_seed(3)
    indexes = torch.randint(0, 2, (4, 500), generator=g)
    symbols = torch.stack(
        [torch.multinomial(tables[int(i)], 1, generator=g)[0] for i in indexes.flatten()]
    ).reshape(indexes.shape)
    data = coder.encode(symbols, indexes)
    assert torch.equal(coder.decode(data, indexes), symbols)
    ideal = coder.ideal_bits(symbols, indexes)
    assert ideal <= 8 * len(data) <= ideal * 1.01 + 64


def test_bad_symbols_tables_and_streams_are_refused():
    coder = CategoricalCoder.from_probabilities(torch.full((2, 8), 1 / 8))
    with pytest.raises(ValueError, match="alphabet"):
        coder.encode(torch.tensor([8]), torch.tensor([0]))
    with pytest.raises(ValueError, match="indexes"):
        coder.encode(torch.tensor([1]), torch.tensor([2]))
    with pytest.raises(ValueError, match="positive integer frequencies"):
        CategoricalCoder([torch.tensor([1, 2, 3])])
    with pytest.raises(ValueError, match="positive total"):
        quantize_pmf(torch.zeros(4))
    garbage = bytes(range(7, 47))
    try:
        decoded = coder.decode(garbage, torch.zeros(64, dtype=torch.long))
    except BitstreamError:
        return
    assert ((decoded >= 0) & (decoded < 8)).all()
