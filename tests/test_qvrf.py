"""QVRF: the variable-rate codec codes exactly at every index and factor, and the three-stage
recipe trains, freezes and carries the right weights (tiny widths, CPU)."""

from __future__ import annotations

import hydra
import pytest
import pytorch_lightning as pl
import torch
from PIL import Image

from src.cli import main
from src.codecs.loading import load_codec
from src.codecs.qvrf import QvrfCodec
from src.coding.container import Rate, unpack
from src.datamodules.images import decode_rgb
from src.errors import CheckpointError, ConfigError, LicError
from src.evaluation.run import evaluate
from src.training import train
from src.utils.checkpoints import read_checkpoint
from src.utils.cli import explain
from tests.conftest import tiny_args
from tests.helpers import compose_evaluate, run_script

TINY_WIDTHS = {"cheng2020_attn": {"N": 8}, "mbt2018_mean": {"N": 8, "M": 8}}
TINY_WIDTHS["bmshj2018_hyperprior"] = TINY_WIDTHS["mbt2018_mean"]


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def photo(sample_root) -> torch.Tensor:
    """A 192×128 crop of a real photo, (1, 3, H, W) in [0, 1]."""
    img = decode_rgb(next((sample_root / "train").glob("*astronaut*"))).float().div(255)
    return img[:, 40:168, 150:342].unsqueeze(0)


class StartState(pl.Callback):
    """Keep a copy of the weights as training starts (after `ckpt=` was loaded)."""

    def on_train_start(self, trainer, pl_module) -> None:
        self.state = {k: v.detach().clone() for k, v in pl_module.state_dict().items()}


def qvrf_args(*overrides: str) -> list[str]:
    return ["model=qvrf", "print_summary=false", "trainer.max_steps=4", *overrides]


# ---- the codec ----------------------------------------------------------------------------------
@pytest.mark.parametrize("backbone", sorted(TINY_WIDTHS))
def test_round_trips_at_an_index_and_a_factor_equal_the_test_mode_forward(photo, backbone):
    torch.manual_seed(0)
    codec = QvrfCodec(backbone, **TINY_WIDTHS[backbone]).eval()
    codec.prepare_for_coding()
    x = photo[..., :70, :90]  # not a multiple of the stride: padding and cropping included
    for rate in (Rate.index(5), Rate.factor(2.2)):
        data = codec.compress_to_bytes(x, rate)
        assert unpack(data).rate == rate  # the header carries the rate ...
        codec.set_rate(Rate.index(0))
        decoded = codec.decompress_bytes(data)  # ... so decoding needs no flag
        assert codec.current_rate() == rate
        with torch.no_grad():
            forward = codec(x)
        assert torch.equal(decoded, forward.x_hat.clamp(0, 1))


@pytest.mark.parametrize("backbone", sorted(TINY_WIDTHS))
def test_training_quantisers_and_what_the_gains_learn_from(photo, backbone):
    torch.manual_seed(0)
    codec = QvrfCodec(backbone, **TINY_WIDTHS[backbone])
    x = photo[..., :64, :128]
    codec.set_rate(Rate.index(4))
    with torch.no_grad():
        decoded = codec.eval()(x).x_hat
    codec.train()
    for quantizer in ("noise", "ste"):
        codec.set_quantizer(quantizer)
        codec.zero_grad()
        out = codec(x)
        (out.total_bits().sum() + 255**2 * (out.x_hat - x).pow(2).mean()).backward()
        assert codec.gain.grad[4] != 0 and codec.gain.grad.count_nonzero() == 1
        # straight-through: the synthesis sees exactly the decoder's latents; noise: it does not
        same = torch.allclose(out.x_hat, decoded, atol=1e-5)
        assert same == (quantizer == "ste")
    codec.set_rate(Rate.index(0))  # the anchor never learns, yet its batches give the gains a
    codec.zero_grad()  # (zero) gradient, as DDP expects of every trainable parameter
    codec(x).total_bits().sum().backward()
    assert codec.gain.grad is not None and codec.gain.grad.count_nonzero() == 0


def test_a_factor_is_the_gain_itself():
    codec = QvrfCodec("mbt2018_mean", N=8, M=8).eval()
    codec.prepare_for_coding()
    x = torch.rand(1, 3, 64, 64)
    at_index = codec.compress(x, Rate.index(3))
    at_factor = codec.compress(x, Rate.factor(codec.gain[3].item()))
    assert at_index.streams == at_factor.streams
    assert codec.gain.tolist() == pytest.approx(
        [1.0, 1.3944, 1.9293, 2.6874, 3.7268, 5.1801, 7.1957, 10.0], abs=1e-4
    )


def test_rates_and_settings_out_of_range_are_refused():
    codec = QvrfCodec("bmshj2018_hyperprior", N=8, M=8)
    for rate in (Rate.index(8), Rate.factor(0.4), Rate.factor(12.5)):
        with pytest.raises(LicError, match="qvrf-bmshj2018-hyperprior"):
            codec.set_rate(rate)
    codec.set_rate(Rate.factor(12.0))
    extended = QvrfCodec("bmshj2018_hyperprior", N=8, M=8, lmbda_set="extended")
    assert extended.num_rates == 11 and extended.gain[-1].item() == pytest.approx(28.2843, 1e-4)
    extended.set_rate(Rate.factor(30.0))
    with pytest.raises(ConfigError, match="model.backbone"):
        QvrfCodec("bmshj2018_factorized")
    with pytest.raises(ConfigError, match="model.lmbda_set"):
        QvrfCodec("mbt2018_mean", lmbda_set="mine")
    with pytest.raises(ConfigError, match="model.lmbda_set"):
        QvrfCodec("mbt2018_mean", lmbda_set=[0.01, 0.001])


# ---- the recipe ---------------------------------------------------------------------------------
def test_each_stage_trains_exactly_its_parameters_with_its_quantiser(compose_train):
    everything = None
    for stage, quantizer in ((1, "noise"), (2, "noise"), (3, "ste")):
        module = hydra.utils.instantiate(compose_train(*qvrf_args(f"stage={stage}")).model)
        names = {n for n, _ in module.named_parameters()}
        everything = everything or names
        trainable = {n for n, p in module.named_parameters() if p.requires_grad}
        assert trainable == (names - {"codec.gain"} if stage == 1 else names)
        assert module.codec.quantizer == quantizer
        assert module.trained_indices() == ([0] if stage == 1 else list(range(8)))
    assert any(n.startswith("codec.net.g_a") for n in everything)
    assert any(n.endswith("quantiles") for n in everything)  # trained by the aux optimiser


def config_error(compose_train, *overrides: str) -> str:
    """The framework error (as a user sees it) that building the recipe raises."""
    with pytest.raises(Exception) as info:
        hydra.utils.instantiate(compose_train(*qvrf_args(*overrides)).model)
    cause = info.value
    while not isinstance(cause, ConfigError) and cause.__cause__ is not None:
        cause = cause.__cause__
    assert isinstance(cause, ConfigError), info.value
    return explain(info.value)


def test_stage_null_means_stage_1_and_an_unknown_stage_is_named(compose_train):
    assert hydra.utils.instantiate(compose_train(*qvrf_args()).model).stage == 1
    assert "stage" in config_error(compose_train, "stage=4")
    assert "model.lmbda_set" in config_error(compose_train, "model.metric=ms-ssim")


def test_three_stages_carry_their_weights_and_stage_2_orders_the_rates(
    tmp_path, sample_root, photo
):
    from tests.conftest import compose_config

    def run(stage: int, *overrides: str) -> tuple[StartState, dict, dict]:
        out = tmp_path / f"stage{stage}"
        cfg = compose_config(out, sample_root, *qvrf_args(f"stage={stage}", *overrides))
        start = StartState()
        metrics = train(cfg, extra_callbacks=[start])
        return start, read_checkpoint(out / "run" / "checkpoints" / "last.ckpt"), metrics

    _, first, metrics = run(1)
    assert "val/loss" in metrics and "val/bpp_0" not in metrics
    assert first["state_dict"]["codec.gain"].tolist() == pytest.approx(
        QvrfCodec("cheng2020_attn", N=8).gain.tolist()
    )
    start, second, metrics = run(
        2,
        f"ckpt={tmp_path}/stage1/run/checkpoints/last.ckpt",
        "trainer.max_steps=12",
        "trainer.val_check_interval=12",
        "model.optimizer.lr=1e-3",
    )
    for key, value in start.state.items():
        if key.startswith("codec.") and "quantized_cdf" not in key:
            assert torch.equal(value, first["state_dict"][key].to(value.dtype)), key
    gains = second["state_dict"]["codec.gain"]
    assert gains[0] == 1.0  # the anchor never moves
    assert not torch.allclose(gains, first["state_dict"]["codec.gain"])  # the others learn
    assert {f"val/{m}_{i}" for m in ("bpp", "psnr") for i in range(8)} <= set(metrics)
    start, _, _ = run(3, f"ckpt={tmp_path}/stage2/run/checkpoints/last.ckpt")
    assert torch.equal(start.state["codec.gain"], gains)

    # After stage 2 the real bpp of a photo grows with the index, and a factor between two
    # trained gains lands between their rates.
    codec = load_codec(tmp_path / "stage2" / "run" / "checkpoints" / "last.ckpt")
    pixels = photo.shape[-2] * photo.shape[-1]
    bpp = [8 * len(codec.compress_to_bytes(photo, Rate.index(i))) / pixels for i in range(8)]
    assert bpp == sorted(bpp) and len(set(bpp)) == 8, bpp
    between = (codec.gain[2] + codec.gain[3]).item() / 2
    middle = 8 * len(codec.compress_to_bytes(photo, Rate.factor(between))) / pixels
    assert bpp[2] < middle < bpp[3]


def test_stage_2_starts_from_a_fixed_rate_checkpoint_of_its_backbone(tmp_path, sample_root):
    from tests.conftest import compose_config

    fixed = tmp_path / "fixed"
    train(compose_config(fixed, sample_root, "model=cheng2020_attn", "trainer.max_steps=2"))
    fixed_ckpt = read_checkpoint(fixed / "run" / "checkpoints" / "last.ckpt")
    out = tmp_path / "stage2"
    cfg = compose_config(
        out, sample_root, *qvrf_args("stage=2", f"ckpt={fixed}/run/checkpoints/last.ckpt")
    )
    start = StartState()
    train(cfg, extra_callbacks=[start])
    for key, value in fixed_ckpt["state_dict"].items():
        if key.startswith("codec.net.") and "quantized_cdf" not in key:
            assert torch.equal(start.state[key], value.to(start.state[key].dtype)), key
    assert start.state["codec.gain"].tolist() == pytest.approx(
        QvrfCodec("cheng2020_attn", N=8).gain.tolist()
    )
    # a fixed-rate model of another backbone does not fit
    cfg = compose_config(
        tmp_path / "other",
        sample_root,
        *qvrf_args(
            "stage=2", "model.backbone=cheng2020_anchor", f"ckpt={fixed}/run/checkpoints/last.ckpt"
        ),
    )
    with pytest.raises(CheckpointError):
        train(cfg)


def test_evaluate_and_the_cli_code_at_indices_and_factors(tmp_path, sample_root, capsys):
    from tests.conftest import compose_config

    widths = [f"model.codec.{k}={v}" for k, v in TINY_WIDTHS["mbt2018_mean"].items()]
    train(
        compose_config(
            tmp_path, sample_root, *qvrf_args("stage=2", "model.backbone=mbt2018_mean", *widths)
        )
    )
    ckpt = tmp_path / "run" / "checkpoints" / "last.ckpt"
    img = decode_rgb(next((sample_root / "val").glob("*chelsea*")))[:, :128, 100:292]
    for split in ("train", "val"):  # one small photo keeps the JPEG ladder and MS-SSIM cheap
        (tmp_path / "photos" / split).mkdir(parents=True)
        Image.fromarray(img.permute(1, 2, 0).numpy()).save(tmp_path / "photos" / split / "cat.png")
    cfg = compose_evaluate(
        tmp_path,
        f"ckpt={ckpt}",
        "data=folder",
        f"data.root={tmp_path}/photos",
        "rate.indices=all",
        "rate.factors=[1.5,3.0]",
    )
    summaries = evaluate(cfg, [str(ckpt)])
    assert len(summaries) == 10
    assert all(s["all_match_forward"] for s in summaries.values())
    by_index = [summaries[f"{ckpt}-index{i}"]["bpp"] for i in range(8)]
    assert by_index == sorted(by_index)
    assert (tmp_path / "eval" / "rd.png").is_file()

    # The CLI codes at an index or a factor; inspect shows it and decompress needs no flag.
    photo = str(tmp_path / "photos" / "val" / "cat.png")
    for flag, value, shown in (("--rate-index", "4", "index 4"), ("--factor", "2.5", "factor 2.5")):
        coded = str(tmp_path / f"cat{value}.lic")
        assert main(["compress", "--ckpt", str(ckpt), flag, value, photo, coded]) == 0
        assert main(["inspect", coded]) == 0
        assert shown in capsys.readouterr().out
        assert main(["decompress", "--ckpt", str(ckpt), coded, str(tmp_path / "rec.png")]) == 0
        assert Image.open(tmp_path / "rec.png").size == (192, 128)


@pytest.mark.slow
def test_stage_2_trains_with_ddp_on_two_cpu_processes(tmp_path, sample_root):
    """Each process draws its own rate; batches at the anchor still give the gains a (zero)
    gradient, as DDP requires of every trainable parameter."""
    args = [*tiny_args(tmp_path, sample_root), "model=qvrf", "stage=2", "trainer=ddp_cpu"]
    proc = run_script("train.py", [*args, "trainer.max_steps=8", "trainer.val_check_interval=8"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    (ckpt,) = (tmp_path / "logs").rglob("last.ckpt")
    checkpoint = read_checkpoint(ckpt)
    assert checkpoint["global_step"] == 8
    assert checkpoint["state_dict"]["codec.gain"][0] == 1.0
