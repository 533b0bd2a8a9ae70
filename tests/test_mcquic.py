"""McQuic: the quantiser, temperature schedules, reassignment, DDP frequencies, coding, configs."""

from __future__ import annotations

import csv
import math
from pathlib import Path

import hydra
import pytest
import pytorch_lightning as pl
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from src.codecs.base import Encoded
from src.codecs.loading import load_codec
from src.codecs.mcquic import McQuic, MultiCodebookQuantizer
from src.coding.container import BitstreamError
from src.datamodules.images import decode_rgb
from src.errors import ConfigError, LicError
from src.evaluation.baselines import classical_codec
from src.evaluation.evaluate import evaluate_image
from src.lightning_modules.mcquic import McQuicRecipe, reassign_on_rank_zero
from src.lightning_modules.temperature import Constant, Cosine, Exponential, temperature_schedule
from src.optim.lamb import Lamb
from src.training import train
from tests.helpers import run_script

# Tiny widths and codebooks, 64² crops (the stride of three levels), a few steps.
TINY_MCQUIC = [
    "model=mcquic",
    "model.codec.N=8",
    "model.codec.codebook_sizes=[16,8,4]",
    "data.crop=64",
    "data.val_crop=64",
    "data.batch_size=2",
    "data.val_batch_size=2",
    "data.repeat=2",
    "trainer.max_steps=3",
    "trainer.val_check_interval=3",
    "trainer.limit_val_batches=1",
    "trainer.log_every_n_steps=1",
    "trainer.max_time=null",
    "callbacks.model_summary=null",
    "model.num_logged_images=1",
    "logger=csv",
]


# ---- temperature ------------------------------------------------------------------------------
def test_temperature_schedules():
    assert [Constant(0.7)(e) for e in (0, 5, 1e6)] == [0.7] * 3
    cosine = Cosine(1.0, 0.1, length=2000)  # the pre-release recipe
    for epoch in (0, 1, 500, 1000, 1999.5, 2000):
        expected = 0.1 + 0.9 * (1 + math.cos(math.pi * epoch / 2000)) / 2
        assert cosine(epoch) == pytest.approx(expected)
    assert cosine(5000) == pytest.approx(0.1)
    exponential = Exponential(1.0, 0.01, length=10, unit="step")
    assert [exponential(s) for s in (0, 5, 10, 20)] == pytest.approx([1.0, 0.1, 0.01, 0.01])
    assert temperature_schedule("cosine", 2.0, 0.5, 4, "step")(2) == pytest.approx(1.25)
    assert isinstance(temperature_schedule("constant", 0.3), Constant)
    with pytest.raises(ConfigError, match="kind"):
        temperature_schedule("linear")
    with pytest.raises(ConfigError, match="unit"):
        Cosine(1.0, 0.1, 10, unit="hour")


# ---- the quantiser ----------------------------------------------------------------------------
def test_quantizer_eval_picks_nearest_codewords_and_training_is_straight_through():
    torch.manual_seed(0)
    q = MultiCodebookQuantizer(m=2, k=16, d=4)
    x = torch.randn(3, 8, 5, 6)
    q.eval()
    quantized, codes, bits = q(x)
    groups = x.reshape(3, 2, 4, 5, 6).permute(0, 1, 3, 4, 2)  # B, m, h, w, d
    nearest = torch.cdist(
        groups.reshape(3, 2, -1, 4).transpose(0, 1).reshape(2, -1, 4), q.codebook
    ).argmin(-1)
    assert torch.equal(codes.transpose(0, 1).reshape(2, -1), nearest)
    assert torch.equal(quantized, q.decode(codes))
    assert torch.allclose(bits, torch.full((3,), 2 * 30 * 4.0), atol=1e-3)  # uniform: log2 16
    q.train()
    before = q.frequency.clone()
    quantized, codes, bits = q(x.requires_grad_(), temperature=0.5)
    (quantized.square().sum() + bits.sum()).backward()
    assert x.grad is not None and q.codebook.grad.abs().sum() > 0 and q.logit_scale.grad is not None
    assert not torch.equal(q.frequency, before)  # the EMA moved in training
    assert torch.allclose(q.frequency.sum(-1), torch.ones(2))


def test_reassignment_revives_never_used_codewords():
    torch.manual_seed(0)
    q = MultiCodebookQuantizer(m=1, k=8, d=2, decay=0.0)
    with torch.no_grad():
        q.codebook[0] = torch.tensor(
            [[0, 0], [4, 0], [0, 4], [4, 4], [50, 50], [60, 60], [70, 70], [80, 80]]
        ).float()
    data = (q.codebook[0, :4].detach().repeat_interleave(50, 0) + torch.randn(200, 2)).T
    x = data.reshape(1, 2, 10, 20)
    q.train()
    q(x)
    dead = q.frequency[0] < 1e-6
    assert dead.tolist() == [False] * 4 + [True] * 4  # the four far codewords are never used
    moved = q.reassign(1e-6, torch.Generator().manual_seed(0), source="most_used")
    assert moved == 4
    q(x)
    assert (q.frequency[0][dead] > 1e-6).all(), q.frequency  # every revived codeword is used
    codec = McQuic(m=2, N=8, codebook_sizes=[16, 8])
    with torch.no_grad():
        codec.quantizers[0].frequency[:, 8:] = 0  # half of level 1 never used
    fractions = codec.reassign_dead_codewords()
    assert fractions == {"level1": 0.5, "level2": 0.0, "all": pytest.approx(16 / 48)}


def test_official_reassignment_copies_random_live_codewords_exactly():
    q = MultiCodebookQuantizer(m=1, k=8, d=2)
    with torch.no_grad():
        q.codebook[0] = torch.arange(16.0).reshape(8, 2)
        q.frequency[0] = torch.tensor([0.4, 0.3, 0.2, 0.1, 0, 0, 0, 0])
    before = q.codebook[0].clone()
    assert q.reassign(1e-6, torch.Generator().manual_seed(0)) == 4
    after = q.codebook[0]
    assert torch.equal(after[:4], before[:4])  # live codewords stay
    sources = [int(torch.nonzero((before[:4] == row).all(1))) for row in after[4:]]
    assert sorted(sources) == [0, 1, 2, 3]  # exact copies, each live codeword once
    # More than k/2 dead: a random k/2 move; the ones left for later rank first as sources.
    with torch.no_grad():
        q.codebook[0] = torch.arange(16.0).reshape(8, 2)
        q.frequency[0] = torch.tensor([0.6, 0.4, 0, 0, 0, 0, 0, 0])
    assert q.reassign(1e-6, torch.Generator().manual_seed(1)) == 4
    after = q.codebook[0]
    kept = [i for i in range(2, 8) if torch.equal(after[i], before[i])]
    moved = [i for i in range(2, 8) if i not in kept]
    assert len(kept) == 2 and torch.equal(after[:2], before[:2])
    candidates = before[[0, 1, *kept]]
    assert all((candidates == after[i]).all(1).any() for i in moved)
    with pytest.raises(ConfigError, match="source"):
        q.reassign(1e-6, source="nearest")


def _ddp_frequencies(rank: int, world: int, init_file: str, out_dir: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    torch.manual_seed(0)
    q = MultiCodebookQuantizer(m=2, k=8, d=2, decay=0.5).train()
    for step in range(3):
        g = torch.Generator().manual_seed(10 * step + rank)
        q.update_frequency(torch.randint(0, 8, (2, 2, 3, 3), generator=g))
    # Reassignment: rank 0 re-seeds, every rank ends with rank 0's codebooks and fractions.
    torch.manual_seed(100 + rank)  # different codebooks and jitter on each rank
    codec = McQuic(m=2, N=4, codebook_sizes=[8])
    with torch.no_grad():
        codec.quantizers[0].frequency[:, 4:] = 0
    fractions = reassign_on_rank_zero(codec, 1e-6)
    torch.save(
        {"codebook": codec.quantizers[0].codebook.detach(), "fractions": fractions},
        Path(out_dir) / f"codebook{rank}.pt",
    )
    torch.save(q.frequency, Path(out_dir) / f"rank{rank}.pt")
    dist.destroy_process_group()


@pytest.mark.slow
def test_frequencies_and_reassigned_codebooks_are_identical_across_two_ddp_processes(tmp_path):
    mp.spawn(_ddp_frequencies, args=(2, str(tmp_path / "init"), str(tmp_path)), nprocs=2)
    f0, f1 = (torch.load(tmp_path / f"rank{r}.pt") for r in (0, 1))
    assert torch.equal(f0, f1)
    c0, c1 = (torch.load(tmp_path / f"codebook{r}.pt") for r in (0, 1))
    assert torch.equal(c0["codebook"], c1["codebook"])
    assert c0["fractions"] == c1["fractions"] == {"level1": 0.5, "all": 0.5}
    # ... and equal to the EMA of the histograms pooled over both ranks.
    expected = torch.full((2, 8), 1 / 8)
    for step in range(3):
        codes = torch.cat(
            [
                torch.randint(
                    0, 8, (2, 2, 3, 3), generator=torch.Generator().manual_seed(10 * step + r)
                )
                for r in (0, 1)
            ]
        )
        hist = torch.stack([torch.bincount(codes[:, i].flatten(), minlength=8) for i in range(2)])
        expected = 0.5 * expected + 0.5 * hist / hist.sum(-1, keepdim=True)
    assert torch.allclose(f0, expected)


class DumpCodeState(pl.Callback):
    """Each rank saves its code frequencies and codebooks when training ends."""

    def __init__(self, path: str) -> None:
        self.path = path

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        state = {
            name: t.detach().cpu()
            for name, t in pl_module.codec.state_dict().items()
            if name.endswith(("frequency", "codebook"))
        }
        torch.save(state, Path(self.path) / f"rank{trainer.global_rank}.pt")


@pytest.mark.slow
def test_ddp_training_keeps_frequencies_and_codebooks_identical_on_every_rank(
    tmp_path, sample_root
):
    args = [
        f"paths.log_dir={tmp_path}/logs",
        f"data.root={sample_root}",
        *TINY_MCQUIC,
        "trainer=ddp_cpu",
        "model.reassign_every=1",
        "model.reassign_unit=step",
        "+callbacks.dump._target_=tests.test_mcquic.DumpCodeState",
        f"+callbacks.dump.path={tmp_path}",
    ]
    proc = run_script("train.py", args)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rank0, rank1 = (torch.load(tmp_path / f"rank{r}.pt") for r in (0, 1))
    assert rank0.keys() == rank1.keys() and len(rank0) == 6
    for name in rank0:
        assert torch.equal(rank0[name], rank1[name]), name
    fresh = torch.full_like(rank0["quantizers.0.frequency"], 1 / 16)
    assert not torch.equal(rank0["quantizers.0.frequency"], fresh)


# ---- configs ----------------------------------------------------------------------------------
def test_paper_size_config_composes_and_builds(compose_train):
    cfg = compose_train("model=mcquic", tiny=False)
    assert cfg.run_name == "mcquic_m2_mse"
    module = hydra.utils.instantiate(cfg.model)
    codec = module.codec
    assert isinstance(module, McQuicRecipe) and isinstance(codec, McQuic)
    assert (codec.m, codec.N, codec.codebook_sizes, codec.stride) == (
        2,
        128,
        [8192, 2048, 512],
        128,
    )
    assert [tuple(q.codebook.shape) for q in codec.quantizers] == [
        (2, 8192, 64),
        (2, 2048, 64),
        (2, 512, 64),
    ]
    assert sum(p.numel() for p in codec.parameters()) == 50_558_738
    optimizers, schedulers = module.configure_optimizers()
    assert isinstance(optimizers[0], Lamb) and schedulers[0]["interval"] == "epoch"
    cfg = compose_train("model=mcquic", "model.m=12", "model.codec.N=192", tiny=False)
    assert cfg.model.codec.m == 12
    cfg = compose_train("experiment=mcquic_mixed_prerelease", tiny=False)
    schedule = hydra.utils.instantiate(cfg.model.temperature)
    assert isinstance(schedule, Cosine) and schedule(1000) == pytest.approx(0.55)
    assert (cfg.model.m, cfg.model.codec.N, cfg.model.optimizer.lr) == (12, 192, 2.5e-3)


def test_paper_preset_is_the_official_v0_1_40_run(compose_train):
    cfg = compose_train("experiment=mcquic_paper", tiny=False)
    assert (cfg.trainer.max_epochs, cfg.trainer.max_steps, cfg.trainer.check_val_every_n_epoch) == (
        2000,
        -1,
        10,
    )
    assert (cfg.model.m, cfg.model.metric, cfg.data.crop, cfg.data.batch_size) == (
        2,
        "ms-ssim",
        512,
        8,
    )
    assert cfg.model.optimizer.lr == pytest.approx(1e-3 * math.sqrt(8) / 8, rel=1e-4)
    assert cfg.model.temperature.kind == "constant" and cfg.model.temperature.start == 1.0
    scheduler = cfg.model.scheduler
    assert (scheduler.cycle_length, scheduler.warmup, scheduler.gamma) == (1000, 2, 0.25)
    assert scheduler.floor_follows_gamma and cfg.model.reassign_from == "random"
    assert (cfg.model.erasing.grid, cfg.model.erasing.share, cfg.model.erase_epochs) == (
        16,
        0.75,
        1000,
    )
    assert (cfg.model.augment.gamma, cfg.model.augment.vflip) == (True, 0.5)
    qp12 = compose_train("experiment=mcquic_qp12", tiny=False)
    assert (qp12.model.m, qp12.model.codec.N, qp12.trainer.max_epochs) == (12, 192, 2000)
    assert len({cfg.run_name, qp12.run_name}) == 2


def test_raw_bound_and_bad_settings():
    codec = McQuic(m=2, N=8)  # paper codebooks, tiny width
    x = torch.rand(1, 3, 64, 64)
    with pytest.raises(LicError, match="prepare_for_coding"):
        codec.compress(x)
    codec.prepare_for_coding()
    encoded = codec.compress(x)
    figures = codec.coding_report(x, encoded)
    assert figures["raw_bound_bpp"] == pytest.approx(0.12744, abs=1e-5)  # the digest's 0.1274
    # Fresh frequencies are uniform: their entropy is the raw bound.
    assert figures["table_entropy_bpp"] == pytest.approx(figures["raw_bound_bpp"], rel=1e-5)
    qp12 = McQuic(m=12, N=12).coding_report(x, encoded)
    assert qp12["raw_bound_bpp"] == pytest.approx(0.7646, abs=1e-4)
    with pytest.raises(ConfigError, match="multiple"):
        McQuic(m=3, N=8)
    truncated = Encoded(encoded.streams[:2], encoded.latent_shape, encoded.image_size)
    with pytest.raises(BitstreamError, match="streams"):
        codec.decompress_bytes(codec.pack(truncated))


# ---- a real tiny run, then real coding --------------------------------------------------------
def test_trained_tiny_model_anneals_reassigns_and_codes_exactly(
    compose_train, tmp_path, sample_root
):
    cfg = compose_train(
        *TINY_MCQUIC,
        "model.temperature.kind=cosine",
        "model.temperature.length=3",
        "model.temperature.unit=step",
        "model.reassign_every=2",
        "model.reassign_unit=step",
        tiny=False,
    )
    train(cfg)
    with open(tmp_path / "run" / "csv" / "metrics.csv") as f:
        rows = list(csv.DictReader(f))
    temps = [
        (int(r["step"]), float(r["train/temperature"])) for r in rows if r["train/temperature"]
    ]
    schedule = Cosine(1.0, 0.1, 3, unit="step")
    # Lightning logs after the step; the temperature was set before it, at global step - 1.
    assert temps == [(s, pytest.approx(schedule(s))) for s in range(3)]
    assert any(r.get("train/reassigned") for r in rows)
    (val,) = [r for r in rows if r.get("val/ideal_bpp")]
    usage = [float(val[f"val/code_usage/level{i}"]) for i in (1, 2, 3)]
    assert all(0 < u <= 1 for u in usage) and float(val["val/code_usage_ema/level1"]) > 0
    # Two 64² crops (padded to 128²): 2·64, 2·16, 2·4 codes per sub-codebook and level; the
    # empirical entropy is at most log2 k bits a code.
    raw = 2 * (128 * 4 + 32 * 3 + 8 * 2) / (2 * 64 * 64)
    assert 0 < float(val["val/ideal_bpp"]) <= raw

    codec = load_codec(tmp_path / "run" / "checkpoints" / "last.ckpt")
    assert any(
        not torch.equal(q.frequency, torch.full_like(q.frequency, 1 / q.k))
        for q in codec.quantizers
    )  # trained frequencies travel with the checkpoint
    img = decode_rgb(next((sample_root / "val").glob("*"))).float().div(255)
    x = img[:, :70, :90].unsqueeze(0)  # not a multiple of the stride
    encoded = codec.compress(x)
    reference = codec(x)
    assert [
        torch.equal(a, b)
        for a, b in zip(
            codec.decode_codes(encoded.streams, encoded.latent_shape), reference.extras["codes"]
        )
    ] == [True] * 3
    assert torch.equal(codec.decompress(encoded), reference.x_hat.clamp(0, 1))
    result = evaluate_image(codec, x, "crop", classical_codec("jpeg").curve(x))
    assert result.matches_forward
    row = result.row()
    assert {"raw_bound_bpp", "table_entropy_bpp", "streams_bpp"} <= set(row)
    assert row["bpp"] > row["streams_bpp"] > 0
