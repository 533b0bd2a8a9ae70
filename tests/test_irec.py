"""iREC: relative entropy coding is bit-exact, costs about the KL, and the VAE codecs code for real."""

from __future__ import annotations

import math
import struct
from dataclasses import replace

import hydra
import pytest
import torch

from src.codecs.base import CodecOutput
from src.codecs.irec import IrecLossless, IrecLossy
from src.coding.container import BitstreamError
from src.coding.rec import (
    RecOptions,
    RelativeEntropyCoder,
    candidate_count,
    pack_digits,
    unpack_digits,
)
from src.datamodules.images import decode_rgb
from src.errors import ConfigError, LicError
from src.lightning_modules.vae import ElboLoss
from src.training import train

LN2 = math.log(2)


@pytest.fixture(scope="module")
def photo(sample_root) -> torch.Tensor:
    """The astronaut photo in [0, 1], (3, H, W)."""
    return decode_rgb(next((sample_root / "train").glob("*astronaut*"))).float().div(255)


def photo_gaussians(
    photo: torch.Tensor, side: int = 8, std: float = 0.2
) -> tuple[torch.Tensor, ...]:
    """A posterior centred on a photo crop and a standard normal prior."""
    crop = photo[:, 200 : 200 + side, 200 : 200 + side]
    q_mean = (crop - 0.5) * 2
    return q_mean, torch.full_like(crop, std), torch.zeros_like(crop), torch.ones_like(crop)


def kl_nats(q_mean, q_std, p_mean, p_std) -> float:
    kl = torch.log(p_std / q_std) + (q_std**2 + (q_mean - p_mean) ** 2) / (2 * p_std**2) - 0.5
    return float(kl.double().sum())


# ---- the coder -----------------------------------------------------------------------------------
def test_candidate_count_and_largest_index():
    assert candidate_count(3.0, 1.0) == 20  # the paper's lossy setting
    assert candidate_count(3.0, 1.2) == 36  # lossless: the reference could only write 0..20
    opts = RecOptions(extra_samples=1.2)
    assert opts.candidates == 36 and opts.max_index == 35
    digits = [35, 0, 21, 35, 7]
    data = pack_digits(digits, opts.candidates)
    assert unpack_digits(data, len(digits), opts.candidates) == (digits, len(data))
    with pytest.raises(ValueError, match="outside 0..35"):
        pack_digits([36], opts.candidates)
    with pytest.raises(ValueError):
        RecOptions(kl_per_partition=0.1)  # exp(0.1) < 2 candidates


def test_decoder_regenerates_the_encoders_sample_bit_for_bit(photo):
    q_mean, q_std, p_mean, p_std = photo_gaussians(photo)
    p_mean = p_mean + 0.1 * torch.randn_like(p_mean)
    opts = RecOptions(n_beams=3, extra_samples=1.2, block_size=64, seed=7)
    encoder = RelativeEntropyCoder(opts)
    z, code = encoder.encode(q_mean, q_std, p_mean, p_std, key=5)
    assert int(code.indices.max()) > 20  # indices above the reference's hard-coded bound
    stream = encoder.pack(code)
    decoder = RelativeEntropyCoder.from_header(encoder.header())
    z_dec = decoder.decode(p_mean, p_std, decoder.unpack(stream, z.numel()), key=5)
    assert z_dec.dtype == z.dtype and torch.equal(z_dec, z)
    # The sample is a plausible posterior draw, not the prior.
    standardised = (z - q_mean) / q_std
    assert abs(float(standardised.mean())) < 0.3 and float(standardised.std()) < 2.0


def test_rec_costs_the_kl_plus_a_stated_overhead(photo):
    """Index bits: log2 K per Ω nats plus rounding; bound: (1 + 3%) · KL · (1 + ε) + per-block
    rounding (one index per block) + 6 bytes per group + the 12-byte header."""
    gaussians = photo_gaussians(photo, side=12)
    opts = RecOptions(n_beams=2, block_size=150)
    coder = RelativeEntropyCoder(opts)
    _, code = coder.encode(*gaussians)
    kl_bits = kl_nats(*gaussians) / LN2
    real_bits = 8 * (len(coder.header()) + len(coder.pack(code)))
    blocks = len(code.n_aux)
    bound = 1.03 * kl_bits * opts.extra_samples + blocks * math.log2(opts.candidates) + 8 * 18
    assert kl_bits > 900
    assert kl_bits < real_bits < bound, (kl_bits, real_bits, bound)


def test_corrupt_rec_streams_raise_the_frameworks_error(photo):
    gaussians = photo_gaussians(photo, std=0.5)
    coder = RelativeEntropyCoder(RecOptions(n_beams=1))
    z, code = coder.encode(*gaussians)
    stream = coder.pack(code)
    p = gaussians[2:]
    with pytest.raises(BitstreamError, match="truncated"):
        coder.unpack(stream[:-3], z.numel())
    with pytest.raises(BitstreamError):
        coder.unpack(stream + b"\0", z.numel())
    wrong_seed = RelativeEntropyCoder(RecOptions(seed=43))
    with pytest.raises(BitstreamError, match="another sample"):
        wrong_seed.decode(*p, code, key=0)
    with pytest.raises(BitstreamError, match="another sample"):
        coder.decode(*p, code, key=1)  # the wrong latent group
    with pytest.raises(BitstreamError, match="header"):
        RelativeEntropyCoder.from_header(struct.pack("<III", 42, 1, 1000))


# ---- the codecs ----------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def lossy() -> IrecLossy:
    torch.manual_seed(0)
    return IrecLossy(N=16, M=8).eval()


def test_lossy_codec_decodes_what_the_encoder_reconstructed(lossy, photo):
    x = photo[:, 100:164, 100:164].unsqueeze(0)
    lossy.set_coding_options(n_beams=2)
    streams, shape, x_hat_encoder = lossy._encode_latents(x)
    assert torch.equal(lossy._decompress_padded(streams, shape), x_hat_encoder)
    encoded = lossy.compress(x)
    data = lossy.pack(encoded)
    assert lossy.decompress_bytes(data).shape == x.shape
    report = lossy.coding_report(x, encoded)
    assert report["real_bits"] == 8 * len(data)
    assert report["rec_bits"] >= report["kl_bits"] > 0
    assert set(report) >= {"kl_bits", "rec_bits", "real_bits", "rec_overhead_percent"}


def test_lossy_file_with_a_wrong_seed_or_cut_short_is_refused(lossy, photo):
    x = photo[:, :70, :90].unsqueeze(0)  # padded to 128 x 128 inside
    lossy.set_coding_options(n_beams=1, seed=3)
    encoded = lossy.compress(x)
    seed_changed = struct.pack("<I", 4) + encoded.streams[0][4:]
    with pytest.raises(BitstreamError, match="another sample"):
        lossy.decompress(replace(encoded, streams=[seed_changed, *encoded.streams[1:]]))
    cut = [encoded.streams[0], encoded.streams[1][:-1], encoded.streams[2]]
    with pytest.raises(BitstreamError):
        lossy.decompress(replace(encoded, streams=cut))
    with pytest.raises(BitstreamError):
        lossy.decompress(replace(encoded, streams=encoded.streams[:2]))
    with pytest.raises(BitstreamError):
        lossy.decompress_bytes(lossy.pack(encoded)[:-10])
    with pytest.raises(LicError, match="coding options"):
        lossy.set_coding_options(beams=3)
    with pytest.raises(LicError, match="bad coding option"):
        lossy.set_coding_options(n_beams=0)


def test_lossless_round_trip_is_exact_and_reports_bits_per_dim(photo):
    torch.manual_seed(0)
    codec = IrecLossless(N=8, z_channels=4, num_blocks=2).eval()
    x = photo[:, 50:81, 60:93].unsqueeze(0)  # odd sizes: padded to the stride and cropped back
    codec.set_coding_options(n_beams=2, extra_samples=1.2)
    encoded = codec.compress(x)
    data = codec.pack(encoded)
    fresh = IrecLossless(N=8, z_channels=4, num_blocks=2).eval()
    fresh.load_state_dict(codec.state_dict())  # the decoder needs no coding options
    x_dec = fresh.decompress_bytes(data)
    assert torch.equal(x_dec * 255, torch.round(x * 255))
    cut = replace(encoded, streams=[*encoded.streams[:-1], encoded.streams[-1][:-5]])
    with pytest.raises(BitstreamError):
        fresh.decompress(cut)
    report = codec.coding_report(x, encoded)
    assert report["bits_per_dim"] == pytest.approx(8 * len(data) / x[0].numel())
    # the pixel stream costs the ideal -log2 p(x | z) plus the table quantisation (< 3 %)
    assert report["nll_bits"] < report["residual_bits"] < 1.03 * report["nll_bits"] + 64


# ---- training ------------------------------------------------------------------------------------
TINY_VAE = [
    "data.crop=64",
    "data.val_crop=64",
    "data.batch_size=2",
    "data.val_batch_size=2",
    "data.repeat=1",
    "trainer.max_steps=2",
    "trainer.val_check_interval=2",
    "trainer.limit_val_batches=1",
    "trainer.log_every_n_steps=1",
    "trainer.max_time=null",
    "callbacks.model_summary=null",
    "model.num_logged_images=0",
    "logger=csv",
]


@pytest.mark.parametrize(
    "overrides",
    [
        ["model=irec_lossy", "model.beta=0.05", "model.codec.N=8", "model.codec.M=8"],
        [
            "model=irec_lossless",
            "model.codec.N=8",
            "model.codec.z_channels=4",
            "model.codec.num_blocks=2",
        ],
    ],
    ids=["lossy", "lossless"],
)
def test_training_steps_are_finite(compose_train, overrides):
    cfg = compose_train(*TINY_VAE, *overrides, tiny=False)
    metrics = train(cfg)
    assert metrics["val/bpp"] > 0
    assert all(math.isfinite(v) for k, v in metrics.items() if k != "val/psnr")


def test_lmbda_is_an_alias_of_beta(compose_train):
    cfg = compose_train("model=irec_lossy", "model.codec.N=8", "model.beta=0.003", tiny=False)
    assert cfg.model.lmbda == 0.003
    with pytest.raises(Exception, match="model.beta") as info:
        hydra.utils.instantiate(compose_train("model=irec_lossy", "model.lmbda=0.1").model)
    assert isinstance(info.value.__cause__ or info.value, ConfigError)


def test_free_bits_charge_each_channel_at_least_the_allowance():
    x = torch.zeros(2, 3, 4, 4)
    kl = torch.tensor([[0.01, 5.0], [0.03, 7.0]], requires_grad=True)  # (batch, channel) nats
    out = CodecOutput(x, {"z": kl.sum(1) / LN2}, {"kl_nats_per_channel": [kl]})
    terms = ElboLoss(beta=0.0, free_bits=0.5)(x, out)
    pixels = 2 * 16
    # channel 0 (mean 0.02 nats) is charged 0.5 nats, channel 1 its own mean 6 nats, per image
    assert float(terms.loss) == pytest.approx(2 * (0.5 + 6.0) / LN2 / pixels)
    assert float(terms.bpp) == pytest.approx(float(kl.sum()) / LN2 / pixels)  # logged: the real KL
    terms.loss.backward()
    assert torch.all(kl.grad[:, 0] == 0) and torch.all(kl.grad[:, 1] > 0)
