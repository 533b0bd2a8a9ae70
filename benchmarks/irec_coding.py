"""iREC coding speed at the paper's settings: a 512 x 768 image, lossy model (B = 10, K = 20).

Relative entropy coding costs what the KL is, not what the weights are, so the coder is timed on
posteriors of the paper-size model's latent shapes (z: 128 x H/64 x W/64, y: 196 x H/16 x W/16)
carrying a chosen rate (default 0.5 bpp, mid-ladder of the paper's Kodak curve), and the
paper-size networks (random weights) are timed on the image separately. Encoding = the
inference and prior networks + the beam search; decoding = the prior and synthesis networks +
regenerating the chosen samples.

    python benchmarks/irec_coding.py                     # one thread
    python benchmarks/irec_coding.py --threads 2 --bpp 1.0
"""

from __future__ import annotations

import argparse
import math
import time

import torch

from src.codecs.irec import IrecLossy
from src.coding.rec import RecOptions, RelativeEntropyCoder, pack_stream, prepare_tables


def synthetic_group(dims: int, kl_per_dim: float, seed: int) -> tuple[torch.Tensor, ...]:
    """A posterior of about `kl_per_dim` nats per dimension against N(0, 1): scale s and means
    m·N(0, 1) with KL = -log s + (s² + m²)/2 - 1/2, here s = m."""
    # solve -log s + s² - 1/2 = kl for s in (0, 1) by bisection
    lo, hi = 1e-6, 1.0
    for _ in range(60):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if -math.log(mid) + mid * mid - 0.5 > kl_per_dim else (lo, mid)
    s = (lo + hi) / 2
    g = torch.Generator().manual_seed(seed)
    q_mean = s * torch.randn(dims, generator=g)
    return q_mean, torch.full((dims,), s), torch.zeros(dims), torch.ones(dims)


def timed(fn, *args, **kwargs):
    """fn(*args, **kwargs) and the seconds it took."""
    start = time.perf_counter()
    result = fn(*args, **kwargs)
    return result, time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--height", type=int, default=512)
    parser.add_argument("--width", type=int, default=768)
    parser.add_argument("--bpp", type=float, default=0.5)
    parser.add_argument("--beams", type=int, default=10)
    parser.add_argument("--extra-samples", type=float, default=1.0)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--no-network", action="store_true", help="time the coder only")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    h, w = args.height, args.width
    shapes = {"z": 128 * (h // 64) * (w // 64), "y": 196 * (h // 16) * (w // 16)}
    kl_per_dim = args.bpp * h * w * math.log(2) / sum(shapes.values())

    _, tables = timed(prepare_tables)
    coder = RelativeEntropyCoder(RecOptions(n_beams=args.beams, extra_samples=args.extra_samples))
    rows, codes, enc_total, dec_total, kl_total = [], [], 0.0, 0.0, 0.0
    for key, (name, dims) in enumerate(shapes.items()):
        q_mean, q_std, p_mean, p_std = synthetic_group(dims, kl_per_dim, key)
        (z, code), t_enc = timed(coder.encode, q_mean, q_std, p_mean, p_std, key=key)
        z_dec, t_dec = timed(coder.decode, p_mean, p_std, code, key=key)
        assert torch.equal(z, z_dec), "decoder regenerated another sample"
        kl = float((-torch.log(q_std) + (q_std**2 + q_mean**2) / 2 - 0.5).double().sum())
        r2 = float(((z - q_mean) / q_std).pow(2).mean())
        rows.append((name, dims, kl / math.log(2), len(code.indices), t_enc, t_dec, r2))
        codes.append(code)
        enc_total, dec_total, kl_total = enc_total + t_enc, dec_total + t_dec, kl_total + kl
    stream = pack_stream(coder, codes, 0)

    print(
        f"{h}x{w}, B={args.beams}, K={coder.candidates}, {args.threads} thread(s); "
        f"shared tables built in {tables:.2f} s (once per process)"
    )
    print("group | dims | KL bits | aux variables | encode s | decode s | E[r^2]")
    for name, dims, kl_bits, n_aux, t_enc, t_dec, r2 in rows:
        print(f"{name} | {dims} | {kl_bits:.0f} | {n_aux} | {t_enc:.2f} | {t_dec:.2f} | {r2:.3f}")
    print(
        f"REC: {8 * len(stream) / (h * w):.4f} bpp for {kl_total / math.log(2) / (h * w):.4f} "
        f"bpp of KL; encode {enc_total:.2f} s, decode {dec_total:.2f} s"
    )

    if args.no_network:
        return
    torch.manual_seed(0)
    codec = IrecLossy().eval()
    x = torch.rand(1, 3, h, w)
    latent = (h // 64, w // 64)

    def mean_pick(group, q, p):
        return (q or p)[0]

    with torch.no_grad():
        _, t_enc_net = timed(codec._walk, x, latent, mean_pick, output=False)
        _, t_dec_net = timed(codec._walk, None, latent, mean_pick)
    print(
        f"paper-size networks: encoder side {t_enc_net:.2f} s (inference, priors), "
        f"decoder side {t_dec_net:.2f} s (priors, synthesis)"
    )
    print(
        f"total: encode {enc_total + t_enc_net + tables:.2f} s, "
        f"decode {dec_total + t_dec_net + tables:.2f} s (tables included)"
    )


if __name__ == "__main__":
    main()
