"""Relative entropy coding (iREC, Flamich et al. 2020) of diagonal Gaussian latents.

Instead of quantising a latent, the encoder sends the indices of prior samples that both sides
draw from a shared seed, chosen so that their sum is (close to) a sample of the posterior q. The
cost is about KL[q || p] nats. Step by step, for one latent group:

1. The dimensions are permuted by a seeded permutation and cut into ceil(dims / block_size)
   blocks of equal length.
2. A block with KL nats is split into n = max(1, ceil(KL / Ω)) auxiliary variables
   a_1 + ... + a_n = z - μp, independent under p, whose variances follow the power law of the
   reference code: step i (counting down n-1 .. 0) takes the fraction (i+1)^-0.786... of the
   variance that is left, the last one all of it.
3. Step j draws K = int(exp(Ω · extra_samples)) candidates for a_j from N(0, σa²) with a
   counter-based hash of (seed, group, block, step, candidate, dimension), so the decoder can
   regenerate any single candidate bit for bit. Each of the `n_beams` beams is extended by every
   candidate and the best B partial sums S = a_1 + ... + a_j survive, ranked by the importance
   weight log q(S)/p(S) under the marginals of S (at the last step, exactly log q(z)/p(z)).
4. The best beam's indices (each in 0 .. K-1) are written as base-K digits: log2 K bits each.

Every number the decoder computes from the seed uses integer hashing, a table lookup, and the
exactly rounded operations + * sqrt, so it does not depend on tensor layout or SIMD paths. A CRC32
of the chosen sample travels with the code: a decoder that regenerates anything else (wrong seed,
other weights, a non-deterministic prior) raises `BitstreamError` instead of returning garbage.

The code is model-agnostic: a codec hands in posterior and prior means and scales per group.
"""

from __future__ import annotations

import math
import struct
import zlib
from dataclasses import dataclass
from functools import cache, lru_cache

import torch
from torch import Tensor

from src.coding.container import BitstreamError

POWER_LAW = 0.7864636765648174  # variance ratio exponent fitted in the reference code
MAX_CANDIDATES = 1 << 16
MAX_BLOCK_SIZE = 1 << 20
MAX_AUX_PER_BLOCK = 1 << 16
HEADER = struct.Struct("<III")  # seed, candidates, block size
CHUNK_ELEMENTS = 1 << 22  # encoder memory per chunk of blocks: (beams + candidates) x dims
_MASK = 0xFFFFFFFF
_GOLDEN = 0x9E3779B9
_TABLE_BITS = 16


@dataclass(frozen=True)
class RecOptions:
    """Encoder settings; the decoder needs only `seed`, `candidates` and `block_size`.

    Args:
        n_beams: B, beams kept by the beam search.
        extra_samples: 1 + ε; K = int(exp(Ω (1 + ε))) candidates per auxiliary variable.
        kl_per_partition: Ω, nats of KL per auxiliary variable.
        block_size: dimensions per block.
        seed: the shared seed (written into the stream header).
    """

    n_beams: int = 10
    extra_samples: float = 1.0
    kl_per_partition: float = 3.0
    block_size: int = 1000
    seed: int = 42

    def __post_init__(self) -> None:
        for name in ("n_beams", "block_size", "seed"):  # options typed on a command line
            value = getattr(self, name)
            if int(value) != value:
                raise ValueError(f"{name} must be an integer, got {value}")
            object.__setattr__(self, name, int(value))
        if int(self.n_beams) < 1:
            raise ValueError(f"n_beams must be at least 1, got {self.n_beams}")
        if not self.kl_per_partition > 0:
            raise ValueError(f"kl_per_partition must be positive, got {self.kl_per_partition}")
        if not self.extra_samples > 0:
            raise ValueError(f"extra_samples must be positive, got {self.extra_samples}")
        if not 1 <= int(self.block_size) <= MAX_BLOCK_SIZE:
            raise ValueError(f"block_size must be in 1..{MAX_BLOCK_SIZE}, got {self.block_size}")
        if not 0 <= int(self.seed) <= _MASK:
            raise ValueError(f"seed must be in 0..{_MASK}, got {self.seed}")
        if not 2 <= self.candidates <= MAX_CANDIDATES:
            raise ValueError(
                f"exp(kl_per_partition * extra_samples) gives {self.candidates} candidates; "
                f"it must be in 2..{MAX_CANDIDATES}"
            )

    @property
    def candidates(self) -> int:
        """K, the number of prior samples each index chooses from."""
        return candidate_count(self.kl_per_partition, self.extra_samples)

    @property
    def max_index(self) -> int:
        """The largest index the code can carry: K - 1."""
        return self.candidates - 1


def candidate_count(kl_per_partition: float, extra_samples: float) -> int:
    """K = int(exp(Ω (1 + ε))), as the reference code counts it (Ω = 3: 20; with 1.2: 36)."""
    return int(math.exp(min(kl_per_partition * extra_samples, 30.0)))


@dataclass
class RecCode:
    """What the decoder needs for one latent group besides the prior.

    `n_aux` holds the number of auxiliary variables per block (in block order), `indices` the
    chosen candidate per auxiliary variable (block after block), `check` the CRC32 of the sample.
    """

    n_aux: Tensor
    indices: Tensor
    check: int


# ---- the shared randomness -------------------------------------------------------------------
def _mul32(x: Tensor, c: int) -> Tensor:
    """(x * c) mod 2^32 for uint32 values held in int64, without overflowing int64."""
    lo, hi = c & 0xFFFF, c >> 16
    return (x * lo + (((x * hi) & 0xFFFF) << 16)) & _MASK


def _mix(x: Tensor) -> Tensor:
    """A 32-bit integer finaliser (xorshift-multiply), bijective on 0 .. 2^32 - 1."""
    x = x ^ (x >> 16)
    x = _mul32(x, 0x7FEB352D)
    x = x ^ (x >> 15)
    x = _mul32(x, 0x846CA68B)
    return x ^ (x >> 16)


def _combine(h: Tensor, v: Tensor | int) -> Tensor:
    """Hash `v` into the running hash `h` (both uint32 in int64)."""
    v = torch.as_tensor(v, dtype=torch.int64)
    return _mix(h ^ _mix((v + _GOLDEN) & _MASK))


@lru_cache(maxsize=1)
def _normal_table() -> Tensor:
    """Standard normal quantiles at 2^16 + 1 evenly spaced nodes, the ends pulled inward."""
    n = 1 << _TABLE_BITS
    u = torch.arange(n + 1, dtype=torch.float64) / n
    u[0], u[-1] = 0.25 / n, 1 - 0.25 / n
    return torch.special.ndtri(u)


def _normal_from_hash(h: Tensor) -> Tensor:
    """N(0, 1) draws from uint32 hashes: the table of quantiles, linearly interpolated."""
    table = _normal_table()
    node = h >> _TABLE_BITS
    frac = (h & ((1 << _TABLE_BITS) - 1)).to(torch.float64) / (1 << _TABLE_BITS)
    left, right = table[node], table[node + 1]
    return left + frac * (right - left)


@cache
def _dim_hashes(block_size: int) -> Tensor:
    return _mix((torch.arange(block_size, dtype=torch.int64) * _GOLDEN + 1) & _MASK)


def _candidates(step_keys: Tensor, candidate: Tensor, block_size: int) -> Tensor:
    """Standard normal candidate vectors (..., block_size) for keys (...) and candidate ids."""
    key = _combine(step_keys, candidate)
    return _normal_from_hash(_mix(key.unsqueeze(-1) ^ _dim_hashes(block_size)))


# ---- the variance schedule -------------------------------------------------------------------
@lru_cache(maxsize=4096)
def _schedule(n: int) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """(fraction of the prior variance taken by step j, cumulative fraction) for n steps."""
    steps, cumulative, total = [], [], 0.0
    for i in range(n - 1, -1, -1):
        new_total = 1.0 if i == 0 else total + (i + 1) ** -POWER_LAW * (1.0 - total)
        steps.append(new_total - total)
        cumulative.append(new_total)
        total = new_total
    return tuple(steps), tuple(cumulative)


def _schedule_table(n_aux: Tensor, steps: int) -> tuple[Tensor, Tensor]:
    """Per-block schedules padded with zeros (step) / ones (cumulative): (blocks, steps) each."""
    step = torch.zeros(len(n_aux), steps, dtype=torch.float64)
    cum = torch.ones(len(n_aux), steps, dtype=torch.float64)
    for b, n in enumerate(n_aux.tolist()):
        s, c = _schedule(int(n))
        step[b, :n] = torch.tensor(s, dtype=torch.float64)
        cum[b, :n] = torch.tensor(c, dtype=torch.float64)
    return step, cum


# ---- the coder -------------------------------------------------------------------------------
class RelativeEntropyCoder:
    """Encode a sample of q against p by index coding with beam search; decode it from the seed."""

    def __init__(self, options: RecOptions | None = None, candidates: int | None = None) -> None:
        self.options = options or RecOptions()
        self.candidates = candidates or self.options.candidates

    @property
    def max_index(self) -> int:
        """The largest index the code can carry: K - 1."""
        return self.candidates - 1

    # -- layout
    def _blocks(self, key: int, num_dims: int) -> tuple[Tensor, int, int]:
        """The seeded permutation of `num_dims` dimensions, the number of blocks and their
        length: ceil(num_dims / block_size) blocks of equal length (the last one padded)."""
        generator = torch.Generator().manual_seed(
            int(_combine(torch.tensor(self.options.seed), key))
        )
        perm = torch.randperm(num_dims, generator=generator)
        n_blocks = -(-num_dims // self.options.block_size)
        return perm, n_blocks, -(-num_dims // max(n_blocks, 1))

    @staticmethod
    def _to_blocks(flat: Tensor, perm: Tensor, n_blocks: int, length: int, fill: float) -> Tensor:
        padded = torch.full((n_blocks * length,), fill, dtype=torch.float64)
        padded[: len(perm)] = flat.reshape(-1)[perm].to(torch.float64)
        return padded.view(n_blocks, length)

    def _from_blocks(self, blocks: Tensor, perm: Tensor, like: Tensor) -> Tensor:
        flat = torch.empty(len(perm), dtype=torch.float64)
        flat[perm] = blocks.reshape(-1)[: len(perm)]
        return flat.view(like.shape).to(like.dtype)

    def _block_keys(self, key: int, n_blocks: int) -> Tensor:
        base = _combine(torch.tensor(self.options.seed), key)
        return _combine(base.expand(n_blocks), torch.arange(n_blocks))

    # -- encoding
    def encode(
        self, q_mean: Tensor, q_std: Tensor, p_mean: Tensor, p_std: Tensor, key: int = 0
    ) -> tuple[Tensor, RecCode]:
        """Choose a sample of N(q_mean, q_std²) coded against N(p_mean, p_std²).

        All four tensors share one shape; `key` tells latent groups apart. Returns the chosen
        sample (the decoder's result, bit for bit, in the input's dtype) and its code.
        """
        opts = self.options
        perm, n_blocks, length = self._blocks(key, q_mean.numel())
        mu_q = self._to_blocks(q_mean, perm, n_blocks, length, 0.0)
        sd_q = self._to_blocks(q_std, perm, n_blocks, length, 1.0)
        mu_p = self._to_blocks(p_mean, perm, n_blocks, length, 0.0)
        sd_p = self._to_blocks(p_std, perm, n_blocks, length, 1.0)
        mask = torch.zeros(n_blocks * length, dtype=torch.float64)
        mask[: q_mean.numel()] = 1.0
        mask = mask.view(n_blocks, length)
        var_p, var_q = sd_p * sd_p, sd_q * sd_q
        kl = 0.5 * (var_q / var_p + (mu_q - mu_p) ** 2 / var_p - 1 + torch.log(var_p / var_q))
        kl_block = (kl * mask).sum(dim=1)
        n_aux = torch.ceil(kl_block / opts.kl_per_partition).clamp(1, MAX_AUX_PER_BLOCK).long()
        keys = self._block_keys(key, n_blocks)
        per_block = (opts.n_beams + self.candidates) * length
        chunk = max(1, CHUNK_ELEMENTS // per_block)
        samples, paths = [], []
        for start in range(0, n_blocks, chunk):
            sl = slice(start, start + chunk)
            s, p = self._beam_search(
                mu_q[sl] - mu_p[sl], var_q[sl], var_p[sl], mask[sl], n_aux[sl], keys[sl]
            )
            samples.append(s)
            paths += p
        z = self._from_blocks(mu_p + torch.cat(samples), perm, q_mean)
        indices = torch.cat([torch.as_tensor(p, dtype=torch.int64) for p in paths])
        return z, RecCode(n_aux, indices, sample_check(z))

    def _beam_search(
        self,
        delta: Tensor,
        var_q: Tensor,
        var_p: Tensor,
        mask: Tensor,
        n_aux: Tensor,
        keys: Tensor,
    ) -> tuple[Tensor, list[list[int]]]:
        """Beam search over a chunk of blocks; returns S (blocks, dims) and each index path.

        Every beam extends with the same K candidates of a step, so the score of beam b plus
        candidate k splits into a beam part, a candidate part and one inner product: all B x K
        scores of a block come from a single batched matrix product.
        """
        opts = self.options
        nb, dims = delta.shape
        beams, k_count = opts.n_beams, self.candidates
        steps = int(n_aux.max())
        step_frac, cum_frac = _schedule_table(n_aux, steps)
        total = torch.zeros(nb, beams, dims, dtype=torch.float64)
        score = torch.full((nb, beams), -math.inf, dtype=torch.float64)
        score[:, 0] = 0.0
        paths = torch.zeros(nb, beams, steps, dtype=torch.int64)
        cand_ids = torch.arange(k_count)
        rows = torch.arange(nb).unsqueeze(1)
        for j in range(steps):
            active = (j < n_aux).view(nb, 1)
            eps = _candidates(_combine(keys, j).unsqueeze(1), cand_ids, dims)  # (nb, K, dims)
            aux = torch.sqrt(step_frac[:, j, None] * var_p).unsqueeze(1) * eps
            # log q(S)/p(S) up to a constant, S = total + aux, under the partial-sum marginals
            c = cum_frac[:, j, None]
            w_p = mask / (c * var_p)
            w_q = mask / (var_q * c * c + var_p * c * (1 - c))
            mean_q = delta * c
            resid = total - mean_q.unsqueeze(1)
            beam_part = (w_p.unsqueeze(1) * total**2 - w_q.unsqueeze(1) * resid**2).sum(-1)
            cand_part = ((w_p - w_q).unsqueeze(1) * aux**2).sum(-1)
            grad = w_p.unsqueeze(1) * total - w_q.unsqueeze(1) * resid  # (nb, B, dims)
            cross = torch.bmm(grad, aux.transpose(1, 2))  # (nb, B, K)
            cand_score = 0.5 * (beam_part.unsqueeze(2) + cand_part.unsqueeze(1)) + cross
            cand_score = torch.where(score.isfinite().unsqueeze(-1), cand_score, -math.inf)
            best, flat = cand_score.view(nb, -1).topk(beams, dim=1)
            parent, index = flat // k_count, flat % k_count
            new_total = total[rows, parent] + aux[rows, index]
            new_paths = paths[rows, parent]
            new_paths[:, :, j] = index
            total = torch.where(active.unsqueeze(-1), new_total, total)
            paths = torch.where(active.unsqueeze(-1), new_paths, paths)
            score = torch.where(active, best, score)
        best_beam = score.argmax(dim=1)
        chosen = paths[rows.squeeze(1), best_beam]
        sample = total[rows.squeeze(1), best_beam]
        return sample, [chosen[b, : n_aux[b]].tolist() for b in range(nb)]

    # -- decoding
    def decode(self, p_mean: Tensor, p_std: Tensor, code: RecCode, key: int = 0) -> Tensor:
        """Regenerate the encoder's sample from the prior, the seed and `code`.

        Raises `BitstreamError` when the code does not fit the latent's size or the regenerated
        sample is not the one the encoder chose.
        """
        perm, n_blocks, length = self._blocks(key, p_mean.numel())
        n_aux = code.n_aux
        if len(n_aux) != n_blocks or int(n_aux.sum()) != len(code.indices):
            raise BitstreamError("REC code does not fit the latent size")
        if len(code.indices) and int(code.indices.max()) > self.max_index:
            raise BitstreamError(f"REC index above {self.max_index}")
        mu_p = self._to_blocks(p_mean, perm, n_blocks, length, 0.0)
        sd_p = self._to_blocks(p_std, perm, n_blocks, length, 1.0)
        var_p = sd_p * sd_p
        keys = self._block_keys(key, n_blocks)
        steps = int(n_aux.max()) if n_blocks else 0
        offsets = torch.cumsum(n_aux, 0) - n_aux
        # Step j touches only the blocks with more than j auxiliary variables (a prefix of the
        # blocks sorted by count), so time and memory follow the code's length, never
        # blocks x steps (which a crafted stream could make huge).
        order = torch.argsort(n_aux, descending=True, stable=True)
        counts = n_aux[order].tolist()
        total = torch.zeros_like(mu_p)
        active = len(counts)
        for j in range(steps):
            while counts[active - 1] <= j:
                active -= 1
            blocks = order[:active]
            frac = torch.tensor(
                [_schedule(n)[0][j] for n in counts[:active]], dtype=torch.float64
            ).unsqueeze(1)
            eps = _candidates(_combine(keys[blocks], j), code.indices[offsets[blocks] + j], length)
            total[blocks] = total[blocks] + torch.sqrt(frac * var_p[blocks]) * eps
        z = self._from_blocks(mu_p + total, perm, p_mean)
        if sample_check(z) != code.check:
            raise BitstreamError(
                "REC decoder regenerated another sample than the encoder chose "
                "(wrong seed, other weights, or a prior that differs between the two machines)"
            )
        return z

    # -- bytes
    def header(self) -> bytes:
        """The 12 bytes the decoder needs: seed, candidates K, block size."""
        o = self.options
        return HEADER.pack(int(o.seed), self.candidates, int(o.block_size))

    @classmethod
    def from_header(cls, data: bytes) -> RelativeEntropyCoder:
        """A decoder for the settings in `header()`'s bytes; `BitstreamError` if they are bad."""
        if len(data) != HEADER.size:
            raise BitstreamError(f"REC header must be {HEADER.size} bytes, got {len(data)}")
        seed, k, block_size = HEADER.unpack(data)
        if not 2 <= k <= MAX_CANDIDATES or not 1 <= block_size <= MAX_BLOCK_SIZE:
            raise BitstreamError(f"REC header out of range (K={k}, block size={block_size})")
        return cls(RecOptions(block_size=block_size, seed=seed), candidates=k)

    def pack(self, code: RecCode) -> bytes:
        """CRC32, then the per-block counts and the indices as base-K digits (see `pack_digits`)."""
        counts = code.n_aux.tolist()
        top = max(counts, default=1)
        body = pack_digits(counts, top + 1) + pack_digits(code.indices.tolist(), self.candidates)
        return struct.pack("<IH", code.check, top) + body

    def unpack(self, data: bytes, num_dims: int) -> RecCode:
        """Read `pack`'s bytes for a latent of `num_dims` dimensions; `BitstreamError` if bad."""
        if len(data) < 6:
            raise BitstreamError("truncated REC stream")
        check, top = struct.unpack("<IH", data[:6])
        n_blocks = -(-num_dims // self.options.block_size)
        counts, used = unpack_digits(data[6:], n_blocks, top + 1)
        if min(counts, default=1) < 1:
            raise BitstreamError("REC stream has a block without auxiliary variables")
        indices, used_indices = unpack_digits(data[6 + used :], sum(counts), self.candidates)
        if 6 + used + used_indices != len(data):
            raise BitstreamError("REC stream is longer than its code")
        return RecCode(
            torch.tensor(counts, dtype=torch.int64), torch.tensor(indices, dtype=torch.int64), check
        )


def sample_check(z: Tensor) -> int:
    """CRC32 of a sample's float32 bytes, the decoder's proof it regenerated the same sample."""
    return zlib.crc32(z.detach().to(torch.float32).contiguous().numpy().tobytes())


# ---- base-K digits ---------------------------------------------------------------------------
DIGIT_CHUNK = 1024


def digit_bytes(count: int, base: int) -> int:
    """Bytes `pack_digits` takes for `count` digits in `base`."""
    full, rest = divmod(count, DIGIT_CHUNK)
    size = full * _chunk_bytes(DIGIT_CHUNK, base)
    return size + (_chunk_bytes(rest, base) if rest else 0)


@lru_cache(maxsize=256)
def _chunk_bytes(count: int, base: int) -> int:
    return -(-((base**count - 1).bit_length()) // 8)


def pack_digits(digits: list[int], base: int) -> bytes:
    """Digits in 0 .. base-1 as a fixed-length code: chunks of 1024 digits, each one integer.

    Each digit costs log2(base) bits (plus at most a byte per chunk): uniform indices need no
    entropy coder. A digit outside 0 .. base-1 cannot be written and raises ValueError.
    """
    if base < 1:
        raise ValueError(f"base must be positive, got {base}")
    out = []
    for start in range(0, len(digits), DIGIT_CHUNK):
        value = 0
        chunk = digits[start : start + DIGIT_CHUNK]
        for d in reversed(chunk):
            if not 0 <= d < base:
                raise ValueError(f"digit {d} is outside 0..{base - 1}")
            value = value * base + d
        out.append(value.to_bytes(_chunk_bytes(len(chunk), base), "little"))
    return b"".join(out)


def unpack_digits(data: bytes, count: int, base: int) -> tuple[list[int], int]:
    """Read `count` digits written by `pack_digits`; returns them and the bytes used."""
    size = digit_bytes(count, base)
    if base < 1 or size > len(data):
        raise BitstreamError(f"truncated REC stream: {count} digits need {size} bytes")
    digits, pos = [], 0
    for start in range(0, count, DIGIT_CHUNK):
        n = min(DIGIT_CHUNK, count - start)
        nbytes = _chunk_bytes(n, base)
        value = int.from_bytes(data[pos : pos + nbytes], "little")
        pos += nbytes
        if value >= base**n:
            raise BitstreamError("corrupt REC stream: digits out of range")
        for _ in range(n):
            value, d = divmod(value, base)
            digits.append(d)
    return digits, pos
