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
3. Each of the B beams extends its partial sum S = a_1 + ... + a_j by K = int(exp(Ω (1 + ε)))
   candidates of its own, and the best B extensions survive, ranked by the importance weight
   log q(S)/p(S) under the marginals of S (at the last step exactly log q(z)/p(z)). As in the
   reference, a beam's candidates are the step's shared draws transformed by a key of the
   beam's index path, so beams explore different candidates (with one set shared by all beams
   the chosen sample is a much worse posterior sample at the same rate). Here the step draws
   two standard normal vectors e_k, e'_k per candidate and the path's key picks a rotation
   (c, s) per dimension: candidate k of the beam is σa · (c e_k + s e'_k), exactly N(0, σa²)
   and uncorrelated across beams. All B·K scores of a block then come from one batched matrix
   product over [e, e', e², e'², e e'].
4. The best beam's indices (each in 0 .. K-1) are written as base-K digits: log2 K bits each.

Shared randomness is read from fixed tables (standard normals, rotations) built once from an
integer hash and a table of normal quantiles; a draw is a window of a table at an offset hashed
from (seed, group, block, step, candidate) or from the beam's path. The decoder regenerates
the chosen path with the exactly rounded operations + * sqrt only, and the encoder returns the
result of that same routine, so both hold the same sample bit for bit whatever the tensor
layout. The scoring runs in float32: it only steers the choice.

One stream holds every latent group of an image (`pack_stream`): short varint settings, one
integrity check chosen by the codec, the per-block counts and the indices as mixed-radix
digits. The code is model-agnostic: a codec hands in posterior and prior means and scales per
group.
"""

from __future__ import annotations

import math
import zlib
from collections.abc import Sequence
from dataclasses import dataclass
from functools import lru_cache

import torch
from torch import Tensor

from src.coding.container import BitstreamError

POWER_LAW = 0.7864636765648174  # variance ratio exponent fitted in the reference code
MAX_CANDIDATES = 1 << 16
MAX_BLOCK_SIZE = 1 << 20
MAX_AUX_PER_BLOCK = 1 << 16
MAX_GROUPS = 1 << 12
CHUNK_ELEMENTS = 1 << 22  # encoder memory per chunk of blocks, in float32 elements
_MASK = 0xFFFFFFFF
_GOLDEN = 0x9E3779B9
_TABLE_BITS = 16
POOL_SIZE = 1 << 21  # the table of shared draws; a step's draws (2 K block_size) fit in it
_POOL_STREAM, _ROTATION_X, _ROTATION_Y = 1, 2, 3  # hash streams


@dataclass(frozen=True)
class RecOptions:
    """Encoder settings; the decoder needs only `seed`, `candidates` and `block_size`.

    Args:
        n_beams: B, beams kept by the beam search.
        extra_samples: 1 + ε; K = int(exp(Ω (1 + ε))) candidates per auxiliary variable.
        kl_per_partition: Ω, nats of KL per auxiliary variable.
        block_size: dimensions per block.
        seed: the shared seed (written into the stream).
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
        if not fits_table(self.candidates, int(self.block_size)):
            raise ValueError(
                f"{self.candidates} candidates of block_size {self.block_size}: a step's draws "
                f"(2 K block_size) must fit the {POOL_SIZE} shared normals"
            )

    @property
    def candidates(self) -> int:
        """K, the number of prior samples each index chooses from."""
        return candidate_count(self.kl_per_partition, self.extra_samples)

    @property
    def max_index(self) -> int:
        """The largest index the code can carry: K - 1."""
        return self.candidates - 1


def fits_table(candidates: int, block_size: int) -> bool:
    """Whether a step's draws, 2 K block_size normals, fit the table of shared draws."""
    return 2 * candidates * block_size <= POOL_SIZE


def candidate_count(kl_per_partition: float, extra_samples: float) -> int:
    """K = int(exp(Ω (1 + ε))), as the reference code counts it (Ω = 3: 20; with 1.2: 36)."""
    return int(math.exp(min(kl_per_partition * extra_samples, 30.0)))


@dataclass
class RecCode:
    """What the decoder needs for one latent group besides the prior.

    `n_aux` holds the number of auxiliary variables per block (in block order), `indices` the
    chosen candidate per auxiliary variable (block after block).
    """

    n_aux: Tensor
    indices: Tensor


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


@lru_cache(maxsize=1)
def _normals() -> Tensor:
    """The table of shared draws: 2^21 standard normals (float64), hashed from their position."""
    positions = torch.arange(POOL_SIZE, dtype=torch.int64)
    return _normal_from_hash(_combine(torch.tensor(_POOL_STREAM), positions))


@lru_cache(maxsize=1)
def _normals32() -> Tensor:
    """The table in float32, for scoring."""
    return _normals().float()


def prepare_tables() -> None:
    """Build the shared tables now (otherwise a process's first encode or decode does)."""
    _normals32()


def _windows(table: Tensor, offsets: Tensor, length: int) -> Tensor:
    """table[o : o + length] for every offset: (*offsets.shape, length)."""
    return table.unfold(0, length, 1)[offsets]


def _offsets(keys: Tensor, length: int) -> Tensor:
    """Offsets of windows of `length` in the table, from uint32 keys."""
    return keys % (POOL_SIZE - length + 1)


def _step_draws(table: Tensor, step_keys: Tensor, k_count: int, length: int) -> Tensor:
    """The draws e_0 .. e_K-1, e'_0 .. e'_K-1 of a step: (*keys, 2K, length), one window."""
    slab = _windows(table, _offsets(step_keys, 2 * k_count * length), 2 * k_count * length)
    return slab.view(*step_keys.shape, 2 * k_count, length)


def _rotation_draws(table: Tensor, path_keys: Tensor, length: int) -> tuple[Tensor, Tensor]:
    """Two windows of normals keyed by a beam's path: their direction is its rotation."""
    x = _windows(table, _offsets(_combine(path_keys, _ROTATION_X), length), length)
    y = _windows(table, _offsets(_combine(path_keys, _ROTATION_Y), length), length)
    return x, y


def _rotation(table: Tensor, path_keys: Tensor, length: int) -> tuple[Tensor, Tensor]:
    """(cos, sin) per dimension of a beam's rotation, of uniform angle (exactly rounded
    operations only)."""
    x, y = _rotation_draws(table, path_keys, length)
    r = torch.sqrt(x * x + y * y)
    zero = r == 0
    r = torch.where(zero, torch.ones_like(r), r)
    return torch.where(zero, torch.ones_like(r), x / r), torch.where(zero, 0.0, y / r)


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
    def num_blocks(self, num_dims: int) -> int:
        """Blocks of a latent group of `num_dims` dimensions: ceil(num_dims / block_size)."""
        return -(-num_dims // self.options.block_size)

    def _blocks(self, key: int, num_dims: int) -> tuple[Tensor, int, int]:
        """The seeded permutation of `num_dims` dimensions, the number of blocks and their
        length: ceil(num_dims / block_size) blocks of equal length (the last one padded)."""
        generator = torch.Generator().manual_seed(
            int(_combine(torch.tensor(self.options.seed), key))
        )
        perm = torch.randperm(num_dims, generator=generator)
        n_blocks = self.num_blocks(num_dims)
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
        # Blocks with similar step counts share a chunk, so few steps run on finished blocks.
        order = torch.argsort(n_aux, stable=True)
        per_block = 5 * (opts.n_beams + self.candidates) * length
        chunk = max(1, CHUNK_ELEMENTS // per_block)
        steps = int(n_aux.max())
        indices = torch.zeros(n_blocks, steps, dtype=torch.int64)
        for start in range(0, n_blocks, chunk):
            sel = order[start : start + chunk]
            indices[sel, : int(n_aux[sel].max())] = self._beam_search(
                mu_q[sel] - mu_p[sel], var_q[sel], var_p[sel], mask[sel], n_aux[sel], keys[sel]
            )
        total = self._regenerate(var_p, n_aux, indices, keys)
        z = self._from_blocks(mu_p + total, perm, q_mean)
        flat = torch.cat([indices[b, : int(n)] for b, n in enumerate(n_aux.tolist())])
        return z, RecCode(n_aux, flat)

    def _beam_search(
        self,
        delta: Tensor,
        var_q: Tensor,
        var_p: Tensor,
        mask: Tensor,
        n_aux: Tensor,
        keys: Tensor,
    ) -> Tensor:
        """Beam search over a chunk of blocks; returns the best path of each (blocks, steps).

        Beam b with rotation angle θ extended by its candidate k, aux = σa (c e_k + s e'_k),
        scores beam_b / 2 + g_b · aux + curv · aux² / 2. With aux² = σa² ((e² + e'²) + cos 2θ
        (e² - e'²) + 2 sin 2θ e e') / 2, every term is a product of a beam-side and a
        candidate-side vector: four batched matrix products give all B x K scores.
        """
        table = _normals32()
        nb, dims = delta.shape
        beams, k_count = self.options.n_beams, self.candidates
        steps = int(n_aux.max())
        step_frac, cum_frac = (t.float() for t in _schedule_table(n_aux, steps))
        delta, var_q, var_p, mask = (t.float() for t in (delta, var_q, var_p, mask))
        total = torch.zeros(nb, beams, dims)
        score = torch.full((nb, beams), -math.inf)
        score[:, 0] = 0.0
        path_key = keys.view(nb, 1).expand(nb, beams).clone()
        parents = torch.zeros(steps, nb, beams, dtype=torch.int64)
        choices = torch.zeros(steps, nb, beams, dtype=torch.int64)
        rows, same = torch.arange(nb).unsqueeze(1), torch.arange(beams).expand(nb, beams)
        for j in range(steps):
            active = (j < n_aux).view(nb, 1)
            draws = _step_draws(table, _combine(keys, j), k_count, dims)
            e, e2 = draws[:, :k_count], draws[:, k_count:]  # (nb, K, dims)
            x, y = _rotation_draws(table, path_key, dims)  # (nb, B, dims): c, s = (x, y) / r
            inv = torch.rsqrt((x * x).addcmul_(y, y).clamp_min_(1e-30))
            sd_a = torch.sqrt(step_frac[:, j, None] * var_p)  # (nb, dims)
            # log q(S)/p(S), S = total + aux, under the partial-sum marginals: with weights
            # w_p, w_q and the mean m of S under q it is, up to a constant of the block,
            # Σ (w_p - w_q) S² / 2 + w_q m S.
            cf = cum_frac[:, j, None]
            w_p = mask / (cf * var_p)
            w_q = mask / (var_q * cf * cf + var_p * cf * (1 - cf))
            u, qm = w_p - w_q, w_q * (delta * cf)
            beam_part = torch.bmm(total * total, u.unsqueeze(2)) + torch.bmm(
                total, 2 * qm[..., None]
            )
            grad = torch.addcmul((qm * sd_a).unsqueeze(1), total, (u * sd_a).unsqueeze(1))
            g = grad.mul_(inv)
            curv = (u * sd_a * sd_a).unsqueeze(1)  # (nb, 1, dims)
            q = (inv * inv).mul_(curv)
            ee, ee2 = e * e, e2 * e2
            cand = 0.5 * beam_part + 0.25 * torch.bmm(curv, (ee + ee2).mT)  # (nb, B, K)
            cand = cand.baddbmm(g * x, e.mT).baddbmm(g * y, e2.mT)
            cand = cand.baddbmm(q * (x - y) * (x + y), (ee - ee2).mT, alpha=0.25)
            cand = cand.baddbmm(q * x * y, (e * e2).mT)
            cand = torch.where(score.isfinite().unsqueeze(-1), cand, -math.inf)
            best, flat = cand.view(nb, -1).topk(beams, dim=1)
            parent, index = flat // k_count, flat % k_count
            aux = (x[rows, parent] * e[rows, index]).addcmul_(y[rows, parent], e2[rows, index])
            aux.mul_(inv[rows, parent]).mul_(sd_a.unsqueeze(1))
            moved = total[rows, parent].add_(aux)
            if bool(active.all()):
                total, score = moved, best
            else:
                total = torch.where(active.unsqueeze(-1), moved, total)
                score = torch.where(active, best, score)
                parent = torch.where(active, parent, same)
            parents[j], choices[j] = parent, index
            path_key = torch.where(active, _combine(path_key[rows, parent], index), path_key)
        # Follow the best beam back to the first step.
        path = torch.zeros(nb, steps, dtype=torch.int64)
        beam, rows = score.argmax(dim=1), rows.squeeze(1)
        for j in reversed(range(steps)):
            path[:, j] = choices[j, rows, beam]
            beam = parents[j, rows, beam]
        return path

    def _regenerate(self, var_p: Tensor, n_aux: Tensor, indices: Tensor, keys: Tensor) -> Tensor:
        """The partial sum S of each block's index path (blocks, dims), in float64: the one
        routine both the encoder's result and the decoder go through."""
        table = _normals()
        dims = var_p.shape[1]
        steps, k_count = indices.shape[1], self.candidates
        step_frac, _ = _schedule_table(n_aux, steps)
        total = torch.zeros_like(var_p)
        path_key = keys.clone()
        for j in range(steps):
            active = j < n_aux
            idx = indices[:, j]
            start = _offsets(_combine(keys, j), 2 * k_count * dims)
            e = _windows(table, start + idx * dims, dims)
            e2 = _windows(table, start + (k_count + idx) * dims, dims)
            c, s = _rotation(table, path_key, dims)
            aux = torch.sqrt(step_frac[:, j, None] * var_p) * (c * e + s * e2)
            total = torch.where(active.unsqueeze(1), total + aux, total)
            path_key = torch.where(active, _combine(path_key, idx), path_key)
        return total

    # -- decoding
    def decode(self, p_mean: Tensor, p_std: Tensor, code: RecCode, key: int = 0) -> Tensor:
        """Regenerate the encoder's sample from the prior, the seed and `code`.

        Raises `BitstreamError` when the code does not fit the latent's size.
        """
        perm, n_blocks, length = self._blocks(key, p_mean.numel())
        n_aux = code.n_aux
        if len(n_aux) != n_blocks or int(n_aux.sum()) != len(code.indices):
            raise BitstreamError("REC code does not fit the latent size")
        if len(code.indices) and int(code.indices.max()) > self.max_index:
            raise BitstreamError(f"REC index above {self.max_index}")
        mu_p = self._to_blocks(p_mean, perm, n_blocks, length, 0.0)
        sd_p = self._to_blocks(p_std, perm, n_blocks, length, 1.0)
        steps = int(n_aux.max()) if n_blocks else 0
        idx = torch.zeros(n_blocks, steps, dtype=torch.int64)
        offsets = torch.cumsum(n_aux, 0) - n_aux
        for b in range(n_blocks):
            idx[b, : n_aux[b]] = code.indices[offsets[b] : offsets[b] + n_aux[b]]
        total = self._regenerate(sd_p * sd_p, n_aux, idx, self._block_keys(key, n_blocks))
        return self._from_blocks(mu_p + total, perm, p_mean)


def sample_check(z: Tensor, value: int = 0) -> int:
    """CRC32 of a sample's float32 bytes, continuing the running check `value`."""
    return zlib.crc32(z.detach().to(torch.float32).contiguous().numpy().tobytes(), value)


# ---- the stream ------------------------------------------------------------------------------
def pack_stream(coder: RelativeEntropyCoder, codes: Sequence[RecCode], check: int) -> bytes:
    """Every latent group of an image in one stream, as compact as the code allows.

        varint seed, varint K, varint block size, uint32 check (little-endian),
        varint T (the most auxiliary variables of any block),
        digits: per group (top_g - 1) in base T, where top_g is the group's most,
        digits: per group and block (n_aux - 1) in base top_g,
        digits: every index in base K, group after group, block after block.

    Digit sections are `pack_digits` codes: log2(base) bits a digit, about a byte per section.
    """
    o = coder.options
    tops = [int(c.n_aux.max()) for c in codes]
    top = max(tops, default=1)
    counts, bases = [], []
    for code, t in zip(codes, tops):
        counts += [n - 1 for n in code.n_aux.tolist()]
        bases += [t] * len(code.n_aux)
    indices = [i for code in codes for i in code.indices.tolist()]
    head = b"".join(_varint(v) for v in (o.seed, coder.candidates, o.block_size))
    return (
        head
        + check.to_bytes(4, "little")
        + _varint(top)
        + pack_digits([t - 1 for t in tops], top)
        + pack_digits(counts, bases)
        + pack_digits(indices, coder.candidates)
    )


def unpack_stream(
    data: bytes, group_dims: Sequence[int]
) -> tuple[RelativeEntropyCoder, list[RecCode], int, bytes]:
    """Read `pack_stream`'s bytes for groups of `group_dims` dimensions.

    Returns a decoder for the stream's settings, the codes, the check and the bytes after the
    REC part (the codec's own payload); `BitstreamError` if the stream is bad.
    """
    if len(group_dims) > MAX_GROUPS:
        raise BitstreamError(f"REC stream for {len(group_dims)} groups (at most {MAX_GROUPS})")
    pos = 0
    seed, pos = _read_varint(data, pos, _MASK)
    k, pos = _read_varint(data, pos, MAX_CANDIDATES)
    block_size, pos = _read_varint(data, pos, MAX_BLOCK_SIZE)
    if k < 2 or block_size < 1 or not fits_table(k, block_size):
        raise BitstreamError(f"REC settings out of range (K={k}, block size={block_size})")
    if pos + 4 > len(data):
        raise BitstreamError("truncated REC stream")
    check = int.from_bytes(data[pos : pos + 4], "little")
    top, pos = _read_varint(data, pos + 4, MAX_AUX_PER_BLOCK)
    if top < 1:
        raise BitstreamError("REC stream has a block without auxiliary variables")
    coder = RelativeEntropyCoder(RecOptions(block_size=block_size, seed=seed), candidates=k)
    tops, used = unpack_digits(data[pos:], len(group_dims), top)
    pos += used
    blocks = [coder.num_blocks(d) for d in group_dims]
    if sum(blocks) > 8 * len(data):  # every block holds an index of at least a bit
        raise BitstreamError("truncated REC stream: more blocks than bytes")
    bases = [t + 1 for t, n in zip(tops, blocks) for _ in range(n)]
    counts, used = unpack_digits(data[pos:], len(bases), bases)
    pos += used
    n_indices = sum(counts) + len(counts)
    if n_indices > 8 * (len(data) - pos):  # every index costs at least a bit (K >= 2)
        raise BitstreamError("truncated REC stream: more indices than bytes")
    digits, used = unpack_digits(data[pos:], n_indices, k)
    indices = torch.tensor(digits, dtype=torch.int64)
    codes, start, first = [], 0, 0
    for n in blocks:
        n_aux = torch.tensor(counts[first : first + n], dtype=torch.int64) + 1
        first += n
        end = start + int(n_aux.sum())
        codes.append(RecCode(n_aux, indices[start:end]))
        start = end
    return coder, codes, check, data[pos + used :]


def stream_header_bytes(data: bytes) -> int:
    """Bytes of `pack_stream`'s framing at the start of `data`: settings, check and T."""
    pos = 0
    for limit in (_MASK, MAX_CANDIDATES, MAX_BLOCK_SIZE):
        _, pos = _read_varint(data, pos, limit)
    return _read_varint(data, pos + 4, MAX_AUX_PER_BLOCK)[1]


def _varint(value: int) -> bytes:
    """LEB128: 7 bits a byte, low first, the top bit set on every byte but the last."""
    out = bytearray()
    while True:
        byte, value = value & 0x7F, value >> 7
        out.append(byte | (0x80 if value else 0))
        if not value:
            return bytes(out)


def _read_varint(data: bytes, pos: int, limit: int) -> tuple[int, int]:
    """One `_varint` at `pos`; returns it and the next position. `BitstreamError` past `limit`."""
    value = shift = 0
    while True:
        if pos >= len(data):
            raise BitstreamError("truncated REC stream")
        byte = data[pos]
        value |= (byte & 0x7F) << shift
        pos += 1
        if value > limit:
            raise BitstreamError(f"REC stream value above {limit}")
        if not byte & 0x80:
            return value, pos
        shift += 7


# ---- mixed-radix digits ----------------------------------------------------------------------
DIGIT_CHUNK = 1024


def _bases(count: int, bases: int | Sequence[int]) -> Sequence[int]:
    return [bases] * count if isinstance(bases, int) else bases


def digit_bytes(count: int, bases: int | Sequence[int]) -> int:
    """Bytes `pack_digits` takes for `count` digits in `bases` (one base, or one per digit)."""
    bases = _bases(count, bases)
    return sum(
        _chunk_bytes(tuple(bases[start : start + DIGIT_CHUNK]))
        for start in range(0, count, DIGIT_CHUNK)
    )


def _chunk_bytes(bases: tuple[int, ...]) -> int:
    return -(-((math.prod(bases) - 1).bit_length()) // 8)


def pack_digits(digits: Sequence[int], bases: int | Sequence[int]) -> bytes:
    """Digits, digit i in 0 .. bases[i]-1, as a fixed-length mixed-radix code: chunks of 1024
    digits, each one integer.

    Each digit costs log2(base) bits (plus at most a byte per chunk; base 1 costs nothing):
    uniform indices need no entropy coder. A digit outside its range raises ValueError.
    """
    bases = _bases(len(digits), bases)
    if len(bases) != len(digits) or any(b < 1 for b in bases):
        raise ValueError("every digit needs a positive base")
    out = []
    for start in range(0, len(digits), DIGIT_CHUNK):
        value = 0
        chunk = range(start, min(start + DIGIT_CHUNK, len(digits)))
        for i in reversed(chunk):
            if not 0 <= digits[i] < bases[i]:
                raise ValueError(f"digit {digits[i]} is outside 0..{bases[i] - 1}")
            value = value * bases[i] + digits[i]
        size = _chunk_bytes(tuple(bases[chunk.start : chunk.stop]))
        out.append(value.to_bytes(size, "little"))
    return b"".join(out)


def unpack_digits(data: bytes, count: int, bases: int | Sequence[int]) -> tuple[list[int], int]:
    """Read `count` digits written by `pack_digits`; returns them and the bytes used."""
    bases = _bases(count, bases)
    if len(bases) != count or any(b < 1 for b in bases):
        raise BitstreamError("corrupt REC stream: a digit without a positive base")
    digits, pos = [], 0
    for start in range(0, count, DIGIT_CHUNK):
        chunk = tuple(bases[start : start + DIGIT_CHUNK])
        nbytes = _chunk_bytes(chunk)
        if pos + nbytes > len(data):
            raise BitstreamError(f"truncated REC stream: {count} digits need more bytes")
        value = int.from_bytes(data[pos : pos + nbytes], "little")
        pos += nbytes
        if value >= math.prod(chunk):
            raise BitstreamError("corrupt REC stream: digits out of range")
        for base in chunk:
            value, d = divmod(value, base)
            digits.append(d)
    return digits, pos
