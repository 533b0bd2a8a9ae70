"""HiFIC: the codec's coding, the two training stages, the three optimisers, the rate penalty."""

from __future__ import annotations

import math
from pathlib import Path

import hydra
import pytest
import pytorch_lightning as pl
import torch

from src.codecs.hific import HificCodec
from src.codecs.loading import load_codec
from src.datamodules.images import decode_rgb
from src.errors import CheckpointError, ConfigError
from src.evaluation.metrics import quantize_8bit
from src.lightning_modules.hific import Hific
from src.losses.adversarial import ConditionalDiscriminator, discriminator_loss, generator_loss
from src.losses.target_rate import TargetRate
from src.training import train
from src.utils.checkpoints import load_weights, read_checkpoint
from tests.conftest import compose_config
from tests.helpers import fit_on_repeated_batch, run_script

# Tiny widths, 64 px crops, random LPIPS (test-only), two generator steps.
TINY_HIFIC = [
    "model.codec.N=4",
    "model.codec.M=8",
    "model.codec.hyper_channels=8",
    "model.n_residual_blocks=1",
    "model.disc_channels=[4,4,4,4]",
    "model.disc_latent_embedding=2",
    "model.lpips_weights=random",
    "data.crop=64",
    "data.val_crop=64",
    "data.batch_size=2",
    "data.val_batch_size=2",
    "data.repeat=2",
    "trainer.max_steps=2",
    "trainer.val_check_interval=2",
    "trainer.limit_val_batches=1",
    "+trainer.num_sanity_val_steps=0",
    "trainer.log_every_n_steps=1",
    "trainer.max_time=null",
    "callbacks.model_summary=null",
    "callbacks.progress_bar=null",
    "model.num_logged_images=1",
    "logger=csv",
]


pytestmark = pytest.mark.usefixtures("one_thread")


def compose_hific(out_dir: Path, sample_root: Path, *overrides: str):
    return compose_config(out_dir, sample_root, *TINY_HIFIC, *overrides, tiny=False)


class Capture(pl.Callback):
    """Keep the module's state as training starts (after any warm start) and at the end."""

    def on_train_start(self, trainer, pl_module) -> None:
        self.module = pl_module
        self.start = {k: v.detach().clone() for k, v in pl_module.state_dict().items()}

    def on_train_end(self, trainer, pl_module) -> None:
        self.end = {k: v.detach().clone() for k, v in pl_module.state_dict().items()}


@pytest.fixture(scope="module")
def stage_a(tmp_path_factory, sample_root) -> tuple[Path, Capture]:
    """A tiny stage A run (no discriminator): its last checkpoint and what it did."""
    out = tmp_path_factory.mktemp("stage_a")
    cfg = compose_hific(out, sample_root, "model=hific_base", "regime=low")
    capture = Capture()
    metrics = train(cfg, extra_callbacks=[capture])
    assert math.isfinite(metrics["train/loss"]) and math.isfinite(metrics["val/lpips"])
    return out / "run" / "checkpoints" / "last.ckpt", capture


def test_stage_a_trains_the_codec_without_a_discriminator(stage_a):
    ckpt, capture = stage_a
    assert capture.module.discriminator is None
    assert not any(k.startswith("discriminator.") for k in capture.end)
    changed = [k for k in capture.start if not torch.equal(capture.start[k], capture.end[k])]
    assert any(k.startswith("codec.encoder.") for k in changed)
    assert any(k.startswith("codec.generator.") for k in changed)
    assert any(k.startswith("codec.hyper_") for k in changed)
    checkpoint = read_checkpoint(ckpt)
    assert checkpoint["codec_name"] == "hific" and checkpoint["global_step"] == 2
    assert checkpoint["hyper_parameters"]["regime"] == "low"


def test_stage_b_warm_starts_from_stage_a_and_the_discriminator_starts_fresh(
    stage_a, tmp_path, sample_root, capsys
):
    ckpt, _ = stage_a
    cfg = compose_hific(tmp_path, sample_root, "model=hific", "regime=low", f"ckpt={ckpt}")
    # The discriminator a fresh stage B module gets (train() seeds the same way).
    pl.seed_everything(cfg.seed, workers=True)
    fresh = hydra.utils.instantiate(cfg.model).discriminator.state_dict()
    capture = Capture()
    metrics = train(cfg, extra_callbacks=[capture])
    assert all(math.isfinite(metrics[k]) for k in ("train/loss", "train/gan", "train/d_loss"))

    stage_a_state = read_checkpoint(ckpt)["state_dict"]
    for key, value in capture.start.items():
        if key.startswith("codec."):
            assert torch.equal(value, stage_a_state[key]), key
        else:
            assert key.startswith("discriminator.")
            assert torch.equal(value, fresh[key[len("discriminator.") :]]), key
    # Both G and D were updated; D took one batch per generator step.
    for part in ("codec.generator.", "discriminator.net."):
        assert any(
            not torch.equal(capture.start[k], capture.end[k])
            for k in capture.start
            if k.startswith(part)
        ), part
    assert int(capture.end["discriminator.steps_taken"]) == 2
    # The codec exported from a stage B checkpoint is the generator side alone.
    last = tmp_path / "run" / "checkpoints" / "last.ckpt"
    codec = load_codec(last)
    assert isinstance(codec, HificCodec)
    assert not any("discriminator" in k for k in codec.state_dict())
    # Validation logs original | stage A | now: stage A's reconstructions were kept at the start.
    x, x_start = capture.module._reference
    assert x.shape == x_start.shape == (1, 3, 64, 64)
    # best.ckpt is the final state, not the one val/loss ranks first.
    best = read_checkpoint(tmp_path / "run" / "checkpoints" / "best.ckpt")
    assert best["global_step"] == 2
    assert all(torch.equal(best["state_dict"][k], v) for k, v in capture.end.items())
    out = capsys.readouterr().out.splitlines()
    evaluate_line = next(line for line in out if "Evaluate it" in line)
    assert evaluate_line.endswith("last.ckpt")


def test_a_warm_start_tolerates_only_the_discriminator_keys(stage_a, tmp_path, sample_root):
    ckpt, _ = stage_a
    cfg = compose_hific(tmp_path, sample_root, "model=hific", "regime=low")
    module = hydra.utils.instantiate(cfg.model)
    load_weights(module, ckpt)  # discriminator.* missing: fine
    module.codec.generator.head[0].gamma = torch.nn.Parameter(torch.ones(1, 3, 1, 1))
    with pytest.raises(CheckpointError, match="different shapes"):
        load_weights(module, ckpt)


def _part_snapshots(module: Hific) -> dict[str, dict[str, torch.Tensor]]:
    quantiles = {id(p) for p in module.codec.aux_parameters()}
    density = {id(p) for p in module.codec.entropy_parameters()}
    parts: dict[str, dict[str, torch.Tensor]] = {"transforms": {}, "density": {}, "quantiles": {}}
    for name, p in module.codec.named_parameters():
        part = (
            "quantiles" if id(p) in quantiles else "density" if id(p) in density else "transforms"
        )
        parts[part][name] = p.detach().clone()
    parts["discriminator"] = {
        n: p.detach().clone() for n, p in module.discriminator.named_parameters()
    }
    return parts


class RecordUpdates(pl.Callback):
    """Which parts of the module each batch changed."""

    def __init__(self) -> None:
        self.changed: list[set[str]] = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self.before = _part_snapshots(pl_module)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        after = _part_snapshots(pl_module)
        self.changed.append(
            {
                part
                for part, params in after.items()
                if any(not torch.equal(v, self.before[part][k]) for k, v in params.items())
            }
        )


def test_each_optimiser_updates_only_its_parameters_with_d_steps_per_g_step(tmp_path, sample_root):
    cfg = compose_hific(
        tmp_path,
        sample_root,
        "model=hific",
        "regime=med",
        "model.d_steps_per_g_step=2",
        "model.gan_loss=least_squares",
    )
    module = hydra.utils.instantiate(cfg.model)
    batch = torch.rand(2, 3, 64, 64)
    recorder = RecordUpdates()
    trainer = fit_on_repeated_batch(module, batch, max_steps=2, repeats=8, callback=recorder)
    assert len(trainer.optimizers) == 3
    assert trainer.global_step == 2  # generator steps only
    d_turn, g_turn = {"discriminator"}, {"transforms", "density", "quantiles"}
    assert recorder.changed == [d_turn, d_turn, g_turn, d_turn, d_turn, g_turn]
    assert int(module.discriminator.steps_taken) == 4


def test_target_rate_penalty_switches_above_the_target_for_both_semantics():
    for semantics, under, warm in (("official", 2.0**-6, 0.5), ("port", 2.0**-4, 2.0)):
        rate = TargetRate(target=0.14, weight_over=2.0, semantics=semantics, warmup_steps=100)
        # After the warm-up: λ_a above the target, λ_b below it.
        assert rate.weight(0.15, step=100) == 2.0
        assert rate.weight(0.13, step=100) == under
        # During it: the target is relaxed to 0.20 and the weights are rescaled.
        assert rate.target_at(0) == pytest.approx(0.20)
        assert rate.weight(0.19, step=0) == pytest.approx(under * warm)
        assert rate.weight(0.21, step=0) == pytest.approx(2.0 * warm)
    assert TargetRate(0.14, 2.0, weight_under=0.1).weight(0.1, step=10**6) == 0.1
    with pytest.raises(ConfigError, match="rate_penalty"):
        TargetRate(0.14, 2.0, semantics="tf")


@pytest.mark.parametrize(
    ("regime", "target", "over"), [("low", 0.14, 2.0), ("med", 0.30, 1.0), ("high", 0.45, 0.5)]
)
def test_regimes_set_the_target_rate_the_weights_and_the_schedule(
    tmp_path, sample_root, regime, target, over
):
    cfg = compose_hific(tmp_path, sample_root, "model=hific", f"regime={regime}")
    module = hydra.utils.instantiate(cfg.model)
    rate = module.rate_target
    assert (rate.target, rate.weight_over, rate.resolved_under()) == (target, over, 2.0**-6)
    assert rate.weight(target + 0.01, step=10**6) == over
    assert cfg.model.scheduler._target_ == "torch.optim.lr_scheduler.MultiStepLR"
    assert list(cfg.model.scheduler.milestones) == [500_000]
    port = compose_hific(
        tmp_path, sample_root, "model=hific", f"regime={regime}", "model.rate_penalty=port"
    )
    assert hydra.utils.instantiate(port.model).rate_target.resolved_under() == 2.0**-4


def test_without_a_regime_training_stops_with_a_clear_error(tmp_path, sample_root):
    cfg = compose_hific(tmp_path, sample_root, "model=hific_base")
    module = hydra.utils.instantiate(cfg.model)
    with pytest.raises(ConfigError, match="regime=low"):
        module.setup("fit")


def test_missing_lpips_weights_stop_with_what_to_place_where(tmp_path, sample_root):
    cfg = compose_hific(
        tmp_path, sample_root, "model=hific_base", "regime=low", f"model.lpips_weights={tmp_path}/w"
    )
    module = hydra.utils.instantiate(cfg.model)
    with pytest.raises(ConfigError) as err:
        module.setup("fit")
    message = str(err.value)
    assert f"{tmp_path}/w" in message
    assert "alexnet-owt-7be5be79.pth" in message and "alex.pth" in message
    assert "model.lpips_weights" in message


def test_round_trip_through_the_container_equals_the_test_mode_forward(stage_a, sample_root):
    codec = load_codec(stage_a[0])
    photo = next((sample_root / "val").iterdir())
    x = decode_rgb(photo)[:, :200, :300].float().div(255).unsqueeze(0)
    data = codec.compress_to_bytes(x)
    decoded = codec.decompress_bytes(data)
    with torch.no_grad():
        forward = codec(x)
    assert decoded.shape == x.shape
    assert torch.equal(quantize_8bit(decoded), quantize_8bit(forward.x_hat.clamp(0, 1)))
    # Padding to 16: a 200×300 image codes a 13×19 latent, not the 16×20 of padding to 64.
    assert codec.compress(x).latent_shape == (13, 19)


@torch.no_grad()
def test_the_streams_cost_the_estimate_within_5_percent(sample_root):
    """Real rANS bits against the eval forward's -log2 p of the rounded latents. The codec is
    tiny and untrained but given sensible scales (σ = 2): an untrained one's far-out symbols are
    escape-coded below their estimated cost, which says nothing about the coder."""
    torch.manual_seed(0)
    codec = HificCodec(N=4, M=8, hyper_channels=8, n_residual_blocks=1).eval()
    codec.hyper_scale[4].weight.mul_(0.01)
    codec.hyper_scale[4].bias.fill_(2.0)
    codec.prepare_for_coding()
    for photo in sorted((sample_root / "val").iterdir()):
        x = decode_rgb(photo)[:, :256, :384].float().div(255).unsqueeze(0)
        out = codec(x)
        streams = codec.compress(x).streams
        for (name, bits), stream in zip(out.bits.items(), streams):  # y, then z
            assert abs(8 * len(stream) - float(bits)) < 0.05 * float(bits), (photo.name, name)


def test_gan_losses_reward_the_right_side():
    real, fake = torch.full((2, 1, 4, 4), 5.0), torch.full((2, 1, 4, 4), -5.0)
    for kind in ("non_saturating", "least_squares"):
        good = discriminator_loss(real, fake, kind)
        bad = discriminator_loss(fake, real, kind)
        assert good < bad
        assert generator_loss(real, kind) < generator_loss(fake, kind)


def test_paper_size_preset_composes_and_counts_its_parameters(tmp_path, sample_root, capsys):
    cfg = compose_config(tmp_path, sample_root, "model=hific", "regime=low", tiny=False)
    assert cfg.model.codec.N == 60 and cfg.model.codec.M == 220
    assert cfg.model.n_residual_blocks == cfg.model.codec.n_residual_blocks == 9
    module = hydra.utils.instantiate(cfg.model)
    counts = module.parameter_counts()
    print(counts)
    assert counts == {
        "encoder": 7_423_420,
        "generator": 156_774_683,
        "hyperprior": 17_278_200,  # z's density with filters (3, 3, 3)
        "discriminator": 2_800_797,  # the TF reference's PatchGAN
    }
    assert "generator" in capsys.readouterr().out
    port = compose_config(
        tmp_path, sample_root, "model=hific", "regime=low", "model.discriminator=port", tiny=False
    )
    assert hydra.utils.instantiate(port.model).parameter_counts()["discriminator"] == 2_793_117


def test_stage_b_resumes_with_its_three_optimisers_and_the_g_d_alternation(
    stage_a, tmp_path, sample_root
):
    first = compose_hific(
        tmp_path / "a", sample_root, "model=hific", "regime=high", f"ckpt={stage_a[0]}"
    )
    train(first)
    last = tmp_path / "a" / "run" / "checkpoints" / "last.ckpt"
    saved = read_checkpoint(last)
    assert len(saved["optimizer_states"]) == 3 and len(saved["lr_schedulers"]) == 2
    again = compose_hific(
        tmp_path / "b",
        sample_root,
        "model=hific",
        "regime=high",
        f"resume={last}",
        "trainer.max_steps=3",
    )
    capture = Capture()
    train(again, extra_callbacks=[capture])
    # One D batch before each G step: the count restarts where the checkpoint left it.
    step = saved["global_step"]
    assert int(saved["state_dict"]["discriminator.steps_taken"]) == step >= 1
    assert int(capture.start["discriminator.steps_taken"]) == step
    assert int(capture.end["discriminator.steps_taken"]) == 3  # and G reached max_steps=3


@pytest.mark.slow
def test_stage_b_trains_with_ddp_on_two_cpu_processes(tmp_path, sample_root):
    # G batches leave D unused and D batches the codec: the recipe tells DDP to expect it.
    args = [a for a in TINY_HIFIC if not a.startswith("+")]
    proc = run_script(
        "train.py",
        [
            "model=hific",
            "regime=low",
            "trainer=ddp_cpu",
            *args,
            f"paths.log_dir={tmp_path}/logs",
            f"data.root={sample_root}",
        ],
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    (ckpt,) = (tmp_path / "logs").rglob("last.ckpt")
    checkpoint = read_checkpoint(ckpt)
    assert checkpoint["global_step"] >= 1
    assert int(checkpoint["state_dict"]["discriminator.steps_taken"]) == checkpoint["global_step"]


@pytest.mark.parametrize(("layout", "stride", "field"), [("tf", 8, 70), ("port", 16, 46)])
def test_discriminator_layouts_give_their_patch_sizes(layout, stride, field):
    torch.manual_seed(0)
    disc = ConditionalDiscriminator(8, (4, 4, 4, 4), 2, layout=layout)
    x = torch.rand(1, 3, 256, 256, requires_grad=True)
    logits = disc(x, torch.rand(1, 8, 16, 16))
    assert logits.shape == (1, 1, 256 // stride, 256 // stride)
    centre = logits.shape[-1] // 2
    logits[0, 0, centre, centre].backward()
    rows = (x.grad.abs().sum(dim=(0, 1, 3)) > 0).nonzero()
    assert int(rows.max() - rows.min()) + 1 == field  # the receptive field, in pixels
    with pytest.raises(ConfigError, match="model.discriminator"):
        ConditionalDiscriminator(8, layout="pix2pix")


def tiny_stage_b(tmp_path, sample_root, *overrides: str) -> Hific:
    cfg = compose_hific(tmp_path, sample_root, "model=hific", "regime=low", *overrides)
    return hydra.utils.instantiate(cfg.model)


def test_generator_loss_is_the_paper_composition(tmp_path, sample_root):
    module = tiny_stage_b(tmp_path, sample_root).train()
    x = torch.rand(2, 3, 64, 64)
    torch.manual_seed(3)
    terms = module.generator_terms(x)
    torch.manual_seed(3)  # the same quantisation noise
    out = module.codec(x)
    pixels = 2 * 64 * 64
    bpp = out.total_bits().sum() / pixels
    quantized_bpp = float(out.extras["quantized_bits"].sum()) / pixels
    rate_weight = module.rate_target.weight(quantized_bpp, step=0)
    mse_255 = ((x - out.x_hat) * 255).pow(2).mean()
    lpips = module.lpips(x, out.x_hat).mean()
    fake = module.discriminator(out.x_hat, out.extras["y_hat"])
    gan = torch.nn.functional.softplus(-fake).mean()  # non-saturating: −log σ(D(x̂))
    expected = rate_weight * bpp + 0.075 * 2**-5 * mse_255 + 1.0 * lpips + 0.15 * gan
    torch.testing.assert_close(terms["loss"], expected)
    # D: real patches towards 1, decoded ones towards 0, both with the image's own ŷ.
    module.eval()
    with torch.no_grad():
        out = module.codec(x)
        y_hat = out.extras["y_hat"]
        real = module.discriminator(x, y_hat)
        fake = module.discriminator(out.x_hat, y_hat)
        expected_d = (
            torch.nn.functional.softplus(-real).mean() + torch.nn.functional.softplus(fake).mean()
        )
        torch.testing.assert_close(module.discriminator_terms(x)["loss"], expected_d)


def test_each_image_meets_its_own_latent_in_the_discriminator(tmp_path, sample_root):
    module = tiny_stage_b(tmp_path, sample_root).eval()
    x = torch.rand(3, 3, 64, 64)
    with torch.no_grad():
        own = [module.codec(x[i : i + 1]) for i in range(3)]
    seen: list[tuple[torch.Tensor, torch.Tensor]] = []
    module.discriminator.register_forward_hook(lambda m, args, out: seen.append(args))
    with torch.no_grad():
        module.discriminator_terms(x)
    ((images, latents),) = seen
    for i in range(3):
        for row, image in ((i, x[i]), (3 + i, own[i].x_hat[0])):  # real, then decoded
            torch.testing.assert_close(images[row], image, rtol=0, atol=1e-5)
            torch.testing.assert_close(latents[row], own[i].extras["y_hat"][0], rtol=0, atol=1e-5)
    # The generator's term: x̂_i with the ŷ_i of the same (noisy) forward pass.
    outputs = []
    module.codec.register_forward_hook(lambda m, args, out: outputs.append(out))
    module.train().generator_terms(x)
    decoded, g_latents = seen[1]
    assert torch.equal(decoded, outputs[0].x_hat)
    assert torch.equal(g_latents, outputs[0].extras["y_hat"])


def test_the_generator_decodes_the_rounded_latent_straight_through():
    codec = HificCodec(N=4, M=8, hyper_channels=8, n_residual_blocks=1).train()
    seen: dict[str, torch.Tensor] = {}

    def keep(name):
        def hook(module, args, out):
            value = args[0] if name == "y_hat" else out
            value.retain_grad()
            seen[name] = value

        return hook

    codec.encoder.register_forward_hook(keep("y"))
    codec.hyper_mean.register_forward_hook(keep("means"))
    codec.generator.register_forward_hook(keep("y_hat"))
    codec(torch.rand(2, 3, 64, 64)).x_hat.sum().backward()
    offsets = seen["y_hat"] - seen["means"][..., :4, :4]
    torch.testing.assert_close(offsets, offsets.round(), rtol=0, atol=1e-5)  # what coding sends
    assert offsets.abs().max() > 0.5
    # Straight through: the decoder's gradient reaches y unchanged, and none goes to the means.
    torch.testing.assert_close(seen["y"].grad, seen["y_hat"].grad)
    assert seen["means"].grad is None or not seen["means"].grad.any()


@pytest.mark.parametrize("regime", ["low", "med", "high"])
def test_paper_preset_is_the_tf_reference_training(tmp_path, sample_root, regime):
    stages = {}
    for model in ("hific_base", "hific"):
        cfg = compose_config(
            tmp_path,
            sample_root,
            "experiment=hific_paper",
            f"regime={regime}",
            f"model={model}",
            tiny=False,
        )
        stages[model] = cfg
        assert cfg.run_name == f"hific_paper_{regime}_{model}"
        assert (cfg.data.crop, cfg.data.batch_size) == (256, 8)
        assert list(cfg.data.downscale) == [0.75, 0.95] and cfg.data.flip is False
        assert cfg.trainer.max_steps == 1_000_000
        assert list(cfg.model.scheduler.milestones) == [500_000]
        assert cfg.model.optimizer.lr == 1e-4 and cfg.model.rate_warmup_steps == 50_000
        assert cfg.model.codec.signed_io is False and cfg.model.discriminator == "tf"
    assert not stages["hific_base"].model.adversarial and stages["hific"].model.adversarial
