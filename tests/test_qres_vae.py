"""QRes-VAE: paper sizes, real coding (lossy, progressive, lossless), the recipe's EMA and spike
guard, progressive evaluation and the generative commands, at tiny widths on CPU."""

from __future__ import annotations

import math
from contextlib import contextmanager
from pathlib import Path

import hydra
import pytest
import pytorch_lightning as pl
import torch
from hydra.errors import InstantiationException
from PIL import Image
from pytorch_lightning.plugins.precision import MixedPrecision
from torch.utils.data import DataLoader

from src import generate
from src.cli import main as cli_main
from src.codecs.loading import load_codec
from src.codecs.qres_vae import QResVAE
from src.coding.container import keep_first_streams, unpack
from src.datamodules.images import decode_rgb
from src.errors import ConfigError, LicError
from src.evaluation.baselines import to_pil
from src.evaluation.metrics import ms_ssim, quantize_8bit
from src.evaluation.progressive import evaluate_progressive
from src.lightning_modules.qres_vae import QResLoss, compressai_lmbda

PRESETS = ("qres34m", "qres17m", "qres34m_lossless")
TINY_RUN = [
    "model.codec.N=8",
    "data.crop=64",
    "data.batch_size=2",
    "trainer.max_time=null",
    "callbacks.model_summary=null",
    "logger=csv",
]


@contextmanager
def one_thread():
    """Tiny models run faster on one thread (and do not fight other processes for cores)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def save_codec(codec: QResVAE, path: Path) -> Path:
    """A checkpoint holding just the codec, as `load_codec` reads it."""
    codec.prepare_for_coding()
    torch.save(
        {
            "state_dict": {f"codec.{k}": v for k, v in codec.state_dict().items()},
            "codec_config": codec.config(),
            "codec_name": codec.name,
        },
        path,
    )
    return path


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    with one_thread():
        yield


@pytest.fixture(scope="module")
def photo(sample_root) -> torch.Tensor:
    """A 64x64 crop of a real photo (the astronaut's face), (1, 3, 64, 64)."""
    img = decode_rgb(next((sample_root / "train").glob("*astronaut*"))).float().div(255)
    return img[:, 100:164, 100:164].unsqueeze(0)


@pytest.fixture(scope="module")
def trained(photo) -> QResVAE:
    """A tiny qres17m fitted to `photo` for 50 steps at λ = 256 (seconds on one thread)."""
    torch.manual_seed(0)
    codec = QResVAE("qres17m", N=8)
    loss = QResLoss(256)
    optimizer = torch.optim.Adam(codec.parameters(), lr=3e-3)
    for _ in range(50):
        terms = loss(photo, codec(photo))
        optimizer.zero_grad()
        terms.loss.backward()
        torch.nn.utils.clip_grad_norm_(codec.parameters(), 2.0)
        optimizer.step()
    assert math.isfinite(float(terms.loss.detach()))
    codec.eval()
    codec.prepare_for_coding()
    return codec


# ---- sizes and configs ------------------------------------------------------------------------
def test_paper_parameter_counts():
    with torch.device("meta"):
        counts = {
            "qres34m": QResVAE("qres34m"),
            "qres17m": QResVAE("qres17m"),
            "qres34m_lossless": QResVAE("qres34m", lossless=True),
        }
    counts = {k: sum(p.numel() for p in m.parameters()) for k, m in counts.items()}
    assert counts["qres34m"] == pytest.approx(34.0e6, rel=0.02)
    assert counts["qres17m"] == pytest.approx(17.0e6, rel=0.02)  # the paper's "17M"
    assert counts["qres34m_lossless"] == pytest.approx(34.0e6, rel=0.02)


@pytest.mark.parametrize("preset", PRESETS)
def test_presets_compose_at_paper_size_with_the_paper_recipe(compose_train, preset):
    cfg = compose_train(f"model={preset}", tiny=False)
    assert cfg.model.scheduler is None  # the paper's constant learning rate
    assert cfg.model.optimizer.lr == pytest.approx(2e-4) and cfg.model.clip_max_norm == 2.0
    with torch.device("meta"):
        codec = hydra.utils.instantiate(cfg.model.codec)
    assert codec.name == preset and len(codec.group_names) == 12 + codec.lossless
    # The user still picks another schedule on the command line.
    cfg = compose_train(f"model={preset}", "lr_schedule=cosine", tiny=False)
    assert "warmup_cosine" in cfg.model.scheduler._target_


def test_qres_paper_preset_is_the_authors_recipe(compose_train):
    cfg = compose_train("experiment=qres_paper", tiny=False, sample_data=False)
    assert (cfg.trainer.strategy, cfg.trainer.devices, cfg.data.batch_size) == ("ddp", 4, 16)
    assert cfg.trainer.max_steps == 600_000 and cfg.trainer.val_check_interval == 1000
    assert cfg.data._target_.endswith("LmdbDataModule") and cfg.data.path.endswith("/coco")
    assert cfg.data.val_path.endswith("/kodak") and cfg.data.val_crop_multiple == 64
    assert cfg.model.codec.arch == "qres34m" and cfg.model.validate_plain
    assert cfg.model.scheduler is None and cfg.model.optimizer.lr == pytest.approx(2e-4)
    guard = {k: cfg.model[k] for k in ("spike_lr_scale", "spike_lr_hold", "spike_min_history")}
    assert guard == {"spike_lr_scale": 0.1, "spike_lr_hold": 10, "spike_min_history": 1}
    assert cfg.model.spike_include_current and cfg.model.ema_warmup_steps == 10000


def test_lambda_conventions_and_bad_values(compose_train):
    assert compressai_lmbda(16) == pytest.approx(0.00426, abs=1e-5)
    assert compressai_lmbda(2048) == pytest.approx(0.545, abs=1e-3)
    cfg = compose_train("model=qres34m", *TINY_RUN, "model.lmbda=0", tiny=False)
    with pytest.raises(InstantiationException, match="lmbda must be positive"):
        hydra.utils.instantiate(cfg.model)
    cfg = compose_train("model=qres34m_lossless", *TINY_RUN, "model.metric=mse", tiny=False)
    with pytest.raises(InstantiationException, match="must be 'nll'"):
        hydra.utils.instantiate(cfg.model)
    with pytest.raises(ConfigError, match="arch"):
        QResVAE("qres99m")


# ---- coding -----------------------------------------------------------------------------------
def test_round_trip_equals_the_test_mode_reconstruction(trained, sample_root):
    img = decode_rgb(next((sample_root / "train").glob("*astronaut*"))).float().div(255)
    x = img[:, 90:160, 80:180].unsqueeze(0)  # 70x100: padded to 128x128 and cropped back
    data = trained.compress_to_bytes(x)
    decoded = trained.decompress_bytes(data)
    with torch.no_grad():
        out = trained(x)
    assert decoded.shape == x.shape
    assert torch.equal(quantize_8bit(decoded), quantize_8bit(out.x_hat))
    assert list(out.bits) == [f"z{i}" for i in range(1, 13)]
    estimated = float(out.total_bits())
    assert 0.8 * estimated < 8 * len(data) < 1.3 * estimated + 8 * 300  # header + 12 streams


def test_progressive_decoding_refines_monotonically(trained, photo, tmp_path):
    """On the photo it was fitted to, decoding groups 1..k gives a distortion that never grows
    with k, ends well below the prior-mean image's (k = 0), and k = L is the full decode."""
    encoded = trained.compress(photo)
    mse = [
        float((quantize_8bit(trained.decompress(encoded, levels=k)) - photo).pow(2).mean())
        for k in range(13)
    ]
    assert all(later <= earlier + 1e-7 for earlier, later in zip(mse[1:], mse[2:])), mse
    assert mse[12] < 0.5 * mse[0], mse
    assert torch.equal(trained.decompress(encoded, levels=12), trained.decompress(encoded))
    with pytest.raises(LicError, match="levels must be in 0..12"):
        trained.decompress(encoded, levels=13)


def lic(*args: object) -> int:
    return cli_main([str(a) for a in args])


def test_files_of_the_first_k_groups_decode_alone(trained, photo, tmp_path, capsys):
    """A file written with `compress --levels k`, or cut from a full file with `cut`, holds k
    streams and decodes (without --levels) to the image `decompress --levels k` makes of the
    full file."""
    ckpt = save_codec(trained, tmp_path / "qres.ckpt")
    to_pil(photo).save(tmp_path / "in.png")
    assert lic("compress", "--ckpt", ckpt, tmp_path / "in.png", tmp_path / "full.lic") == 0
    k3_file = tmp_path / "k3.lic"
    assert lic("compress", "--ckpt", ckpt, "--levels", 3, tmp_path / "in.png", k3_file) == 0
    assert lic("cut", tmp_path / "full.lic", tmp_path / "cut3.lic", "--levels", 3) == 0
    full, k3 = (tmp_path / "full.lic").read_bytes(), (tmp_path / "k3.lic").read_bytes()
    assert (tmp_path / "cut3.lic").read_bytes() == k3 == keep_first_streams(full, 3)
    assert len(unpack(k3).streams) == 3 and len(k3) < len(full)
    a_png = tmp_path / "a.png"
    assert lic("decompress", "--ckpt", ckpt, "--levels", 3, tmp_path / "full.lic", a_png) == 0
    assert lic("decompress", "--ckpt", ckpt, tmp_path / "k3.lic", tmp_path / "b.png") == 0
    from_full = decode_rgb(a_png).unsqueeze(0)
    assert torch.equal(decode_rgb(tmp_path / "b.png").unsqueeze(0), from_full)
    assert torch.equal(from_full.float().div(255), quantize_8bit(trained.decompress_bytes(full, 3)))
    # The later groups are not in the file: asking for them is refused, not made up.
    assert lic("decompress", "--ckpt", ckpt, "--levels", 4, k3_file, tmp_path / "c.png") == 2
    assert "holds 3 of 12 coded groups" in capsys.readouterr().err
    # Fewer levels of a cut file still decode; so does a tiled file cut tile by tile.
    assert torch.equal(trained.decompress_bytes(k3, 2), trained.decompress_bytes(full, 2))
    wide = torch.cat([photo, photo.flip(-1)], dim=-1)
    tiled = trained.compress_to_bytes(wide, tile=64)
    assert torch.equal(
        trained.decompress_bytes(keep_first_streams(tiled, 5)), trained.decompress_bytes(tiled, 5)
    )
    assert keep_first_streams(tiled, 5) == trained.compress_to_bytes(wide, tile=64, levels=5)


def test_progressive_evaluation_writes_the_curve_and_strips(trained, photo, tmp_path, monkeypatch):
    """Each point of the curve is coded and decoded as the file of its first k groups: the
    decoder sees exactly k streams (never the full file) and the rate is that file's size."""
    seen: list[tuple[int, int | None]] = []
    decode = trained._decompress_padded

    def recording(streams, latent_shape, levels=None):
        seen.append((len(streams), levels))
        return decode(streams, latent_shape, levels)

    monkeypatch.setattr(trained, "_decompress_padded", recording)
    curve = evaluate_progressive(trained, [photo], ["face.png"], "qres", tmp_path)
    assert seen == [(k, None) for k in range(1, 13)]
    full = trained.compress_to_bytes(photo)
    for k, bpp in zip(range(1, 13), curve["bpp"]):
        assert bpp == pytest.approx(8 * len(keep_first_streams(full, k)) / 64**2)
    assert curve["levels"] == [float(k) for k in range(1, 13)]
    assert curve["bpp"] == sorted(curve["bpp"]) and curve["bpp"][0] < curve["bpp"][-1]
    assert curve["psnr"][-1] > curve["psnr"][0]
    # The full file's rate is the last point.
    assert curve["bpp"][-1] == pytest.approx(8 * len(trained.compress_to_bytes(photo)) / 64**2)
    rows = (tmp_path / "qres-progressive.csv").read_text().splitlines()
    assert rows[0] == "image,levels,bpp,psnr,ms_ssim" and len(rows) == 13
    assert (tmp_path / "qres-progressive.json").is_file()
    assert (tmp_path / "qres-progressive-rd.png").is_file()
    with Image.open(tmp_path / "qres-progressive" / "face.png") as strip:
        assert strip.size == (13 * 64, 64)  # k = 1..12, then the original


@pytest.mark.parametrize("tiny_scale", [False, True])
def test_lossless_round_trip_is_bit_exact(sample_root, tiny_scale):
    torch.manual_seed(0)
    codec = QResVAE("qres34m", N=8, lossless=True).eval()
    if tiny_scale:  # scales far below the table: every residual is coded by the escape path
        torch.nn.init.constant_(codec.out_logscale[0].bias, -12.0)
    codec.prepare_for_coding()
    img = decode_rgb(next((sample_root / "train").glob("*astronaut*"))).float().div(255)
    x = img[:, 200:270, 150:240].unsqueeze(0)
    data = codec.compress_to_bytes(x)
    decoded = codec.decompress_bytes(data)
    assert torch.equal((decoded * 255).round(), (x * 255).round())
    assert codec.name == "qres34m_lossless" and len(codec.group_names) == 13
    with torch.no_grad():
        out = codec(x)
    assert "pixels" in out.bits and torch.equal(out.x_hat, x)
    report = codec.coding_report(x, codec.compress(x))
    assert report["exact"] == 1.0
    assert report["bits_per_dim"] == pytest.approx(8 * len(data) / x[0].numel())
    # Without the pixel stream the decoder shows the pixel model's mean image.
    assert codec.decompress(codec.compress(x), levels=12).shape == x.shape


# ---- training recipe --------------------------------------------------------------------------
class Inject(pl.Callback):
    """Blow up the loss of chosen training batches; remember the weights around them."""

    def __init__(self, spikes: dict[int, float]) -> None:
        self.spikes = spikes
        self.losses: list[float] = []
        self.around: dict[int, tuple] = {}

    def on_train_batch_start(self, trainer, module, batch, batch_idx) -> None:
        if batch_idx in self.spikes:
            factor = self.spikes[batch_idx]
            original = module.rd_loss.__class__.__call__

            def scaled(loss_self, x, out):
                terms = original(loss_self, x, out)
                terms.loss = terms.loss * factor
                return terms

            module.rd_loss = type("Spiked", (type(module.rd_loss),), {"__call__": scaled})(
                module.rd_loss.lmbda
            )
            self.around[batch_idx] = (self._weights(module), trainer.global_step)

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx) -> None:
        self.losses.append(float(outputs["loss"] if isinstance(outputs, dict) else outputs))
        if batch_idx in self.spikes:
            module.rd_loss = QResLoss(module.rd_loss.lmbda)
            before, step = self.around[batch_idx]
            self.around[batch_idx] = (before, self._weights(module), step, trainer.global_step)

    @staticmethod
    def _weights(module) -> tuple[torch.Tensor, torch.Tensor]:
        online = torch.cat([p.detach().flatten() for p in module.online.parameters()])
        ema = torch.cat([p.detach().flatten() for p in module.codec.parameters()])
        return online.clone(), ema.clone()


def test_training_skips_spikes_and_keeps_ema_weights_for_validation_and_export(
    compose_train, photo, tmp_path
):
    cfg = compose_train(
        "model=qres17m",
        *TINY_RUN,
        "model.ema_decay=0.5",
        "model.ema_warmup_steps=1",
        "model.spike_lr_scale=0",  # skip spike steps (the reference takes them at 0.1x)
        tiny=False,
    )
    module = hydra.utils.instantiate(cfg.model)
    batch = photo.expand(2, -1, -1, -1).contiguous()
    inject = Inject({12: 1e4, 13: float("nan")})
    trainer = pl.Trainer(
        max_steps=14,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[inject],
        accelerator="cpu",
    )
    trainer.fit(module, DataLoader([batch] * 16, batch_size=None))

    finite = [v for i, v in enumerate(inject.losses) if i != 13]
    assert all(math.isfinite(v) for v in finite) and len(inject.losses) == 16
    assert module.skipped_steps == 2 and trainer.global_step == 14
    for idx in (12, 13):  # neither the weights nor the EMA moved, and no step was counted
        (online_0, ema_0), (online_1, ema_1), step_0, step_1 = inject.around[idx]
        assert torch.equal(online_0, online_1) and torch.equal(ema_0, ema_1) and step_0 == step_1
    (online_0, ema_0), (online_1, ema_1), _, _ = inject.around[12]
    assert not torch.equal(online_0, ema_0)  # decay 0.5: the EMA lags the online weights

    # Validation measures the EMA codec.
    with torch.no_grad():
        module.codec.eval()
        torch.manual_seed(0)
        expected = float(module.rd_loss(batch, module.codec(batch)).loss)
        module.online.eval()
        online = float(module.rd_loss(batch, module.online(batch)).loss)
    assert expected != pytest.approx(online)
    metrics = trainer.validate(module, DataLoader([batch], batch_size=None), verbose=False)
    assert metrics[0]["val/loss"] == pytest.approx(expected, rel=1e-5)

    # The checkpoint's codec (what load_codec, evaluate.py and the CLI use) is the EMA.
    trainer.save_checkpoint(tmp_path / "last.ckpt")
    codec = load_codec(tmp_path / "last.ckpt")
    exported = torch.cat([p.flatten() for p in codec.parameters()])
    ema = torch.cat([p.flatten() for p in module.codec.parameters()])
    assert torch.equal(exported, ema)
    checkpoint = torch.load(tmp_path / "last.ckpt", weights_only=True)
    assert any(k.startswith("online.") for k in checkpoint["state_dict"])  # resume trains on
    assert checkpoint["qres_guard"]["skipped_steps"] == 2


# ---- generative uses --------------------------------------------------------------------------
def run_generate(command: str, ckpt: str, out: Path | str, *args: str) -> int:
    """`lic-generate COMMAND --ckpt CKPT --out OUT ARGS...`; its exit status."""
    return generate.main([command, "--ckpt", ckpt, "--out", str(out), *args])


def test_generate_commands_write_png_grids(trained, photo, sample_root, tmp_path):
    ckpt = str(save_codec(trained, tmp_path / "qres.ckpt"))
    to_pil(photo).save(tmp_path / "a.png")
    img = decode_rgb(next((sample_root / "train").glob("*astronaut*"))).float().div(255)
    to_pil(img[:, 300:364, 200:264]).save(tmp_path / "b.png")
    a, b = str(tmp_path / "a.png"), str(tmp_path / "b.png")
    args = ["--n", "3", "--size", "64", "128", "--temperature", "0", "0.8"]
    assert run_generate("sample", ckpt, tmp_path / "s.png", *args) == 0
    assert run_generate("interpolate", ckpt, tmp_path / "i.png", "--steps", "4", a, b) == 0
    box = ["--box", "0.25", "0.25", "0.75", "0.75"]
    assert (
        run_generate("inpaint", ckpt, tmp_path / "p.png", "--n", "2", "--iterations", "2", *box, a)
        == 0
    )
    # make_grid: 2 px padding around and between images.
    with Image.open(tmp_path / "s.png") as grid:
        assert grid.size == (3 * 130 + 2, 2 * 66 + 2)  # 3 samples x 2 temperatures
    with Image.open(tmp_path / "i.png") as grid:
        assert grid.size == (6 * 66 + 2, 66 + 2)  # a, 4 blends, b
    with Image.open(tmp_path / "p.png") as grid:
        assert grid.size == (4 * 66 + 2, 66 + 2)  # original, masked, 2 samples
    raw = ["--n", "2", "--raw", *box, a]
    assert run_generate("inpaint", ckpt, tmp_path / "r.png", *raw) == 0
    with Image.open(tmp_path / "r.png") as grid:
        assert grid.size == (4 * 66 + 2, 66 + 2)


def test_inpainting_keeps_1x1_latents_and_can_return_the_raw_sample(trained, photo):
    # A 64 x 64 image has a 1 x 1 top latent. Every prior sample is drawn whether kept or not,
    # so with the same seed, inpainting the whole image equals sampling with z1 given alone
    # exactly when the 1 x 1 latent is kept (redrawing it would change every pixel).
    latents = trained.latents(photo)
    assert latents[0].shape[-2:] == (1, 1)
    torch.manual_seed(3)
    whole = trained.generate(1, (64, 64), latents, 1.0, box=(0.0, 0.0, 1.0, 1.0))
    torch.manual_seed(3)
    top_only = trained.generate(1, (64, 64), latents[:1], 1.0)
    assert torch.equal(whole, top_only)

    box = (0.25, 0.25, 0.75, 0.75)
    torch.manual_seed(4)
    masked, raw = generate.inpaint(trained, photo, box, n=2, temperature=0.5, raw=True)
    torch.manual_seed(4)
    _, pasted = generate.inpaint(trained, photo, box, n=2, temperature=0.5)
    torch.manual_seed(4)
    expected = trained.generate(
        2, (64, 64), trained.latents(masked.expand(2, -1, -1, -1)), 0.5, box
    )
    assert torch.equal(raw, expected)  # the decoded sample itself
    inside = torch.zeros(64, 64, dtype=torch.bool)
    inside[16:48, 16:48] = True
    assert torch.equal(pasted[..., inside], raw[..., inside])
    assert torch.equal(pasted[..., ~inside], photo.expand(2, -1, -1, -1)[..., ~inside])
    assert not torch.allclose(raw[..., ~inside], pasted[..., ~inside], atol=1 / 255)


def test_generate_refuses_bad_input_with_clear_errors(trained, tmp_path, capsys):
    ckpt = str(save_codec(trained, tmp_path / "qres.ckpt"))
    assert run_generate("sample", ckpt, tmp_path / "s.png", "--size", "60", "64") == 2
    assert "multiples of 64" in capsys.readouterr().err
    assert run_generate("sample", str(tmp_path / "none.ckpt"), "x.png") == 2
    assert "does not exist" in capsys.readouterr().err
    to_pil(torch.rand(1, 3, 64, 64)).save(tmp_path / "a.png")
    box = ["--box", "0.5", "0", "0.2", "1"]
    assert run_generate("inpaint", ckpt, tmp_path / "p.png", *box, str(tmp_path / "a.png")) == 2
    assert "--box" in capsys.readouterr().err


class Recording:
    """What Lightning's optimizer wrapper offers the recipe; remembers the rate of each step."""

    def __init__(self, lr: float = 2e-4) -> None:
        self.optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=lr)
        self.rates: list[float] = []

    def step(self) -> None:
        self.rates.append(self.optimizer.param_groups[0]["lr"])

    def zero_grad(self) -> None:
        self.rates.append(0.0)


def guard(compose_train, *overrides: str):
    cfg = compose_train("model=qres17m", *TINY_RUN, *overrides, tiny=False)
    return hydra.utils.instantiate(cfg.model)


def run_guard(module, norms: list[float]) -> list[float]:
    """The learning rate each step was taken at (0: skipped) for a sequence of gradient norms."""
    optimizer, loss = Recording(), torch.tensor(1.0)
    for step, norm in enumerate(norms):
        module.guarded_step(optimizer, norm, loss, step)
    assert optimizer.optimizer.param_groups[0]["lr"] == 2e-4  # the schedule's rate is untouched
    return optimizer.rates


def test_spike_guard_follows_the_reference_by_default(compose_train):
    """The reference's loop: the window's median includes the judged norm, judging starts at
    once, a spike is taken at 0.1x the rate, and that reduction holds (and compounds) until the
    step count next reaches a multiple of 10. The EMA skips spike steps."""
    module = guard(compose_train)
    ema_steps = []
    module.update_ema = ema_steps.append
    lr, low = 2e-4, 2e-5
    rates = run_guard(module, [1.0] * 12 + [50.0, 1.0, 60.0] + [1.0] * 7)
    assert rates[:12] == [lr] * 12
    assert rates[12:15] == pytest.approx([low, low, low / 10])  # steps 12, 13, 14 (a 2nd spike)
    assert rates[15:20] == pytest.approx([low / 10] * 5) and rates[20:] == [lr] * 2  # reset at 20
    assert ema_steps == [s for s in range(22) if s not in (12, 14)]
    assert module.spike_steps == 2 and module.skipped_steps == 0

    # Judged from the second norm on, with the judged norm in the window: [1, 20] has median
    # 10.5, so 20 is no spike; the window of earlier norms alone (median 1) would call it one.
    assert run_guard(guard(compose_train), [1.0, 20.0, 1.0, 300.0]) == pytest.approx(
        [lr, lr, lr, low]
    )
    older = guard(compose_train, "model.spike_include_current=false")
    assert run_guard(older, [1.0, 20.0]) == pytest.approx([lr, low])
    waits = guard(compose_train, "model.spike_min_history=5")
    assert run_guard(waits, [1.0, 300.0, 1.0, 1.0, 1.0, 300.0]) == pytest.approx([lr] * 5 + [low])


def test_spike_guard_can_skip_spikes_or_restore_the_rate_at_once(compose_train):
    module = guard(compose_train, "model.spike_lr_scale=0")
    assert run_guard(module, [1.0] * 5 + [50.0, math.nan, 1.0]) == [2e-4] * 5 + [0.0, 0.0, 2e-4]
    assert module.skipped_steps == 2 and module.grad_norms.count(50.0) == 1
    module = guard(compose_train, "model.spike_lr_hold=1")
    rates = run_guard(module, [1.0] * 5 + [50.0, 1.0])
    assert rates == pytest.approx([2e-4] * 5 + [2e-5, 2e-4])
    module = guard(compose_train)
    assert run_guard(module, [1.0] * 5 + [math.inf]) == [2e-4] * 5 + [0.0]  # never stepped
    with pytest.raises(InstantiationException, match="spike_min_history"):
        guard(compose_train, "model.spike_min_history=0")


def test_validating_plain_and_ema_weights_keeps_the_better(compose_train, photo, tmp_path):
    cfg = compose_train("model=qres17m", *TINY_RUN, "model.validate_plain=true", tiny=False)
    module = hydra.utils.instantiate(cfg.model)
    batch = photo.expand(2, -1, -1, -1).contiguous()
    trainer = pl.Trainer(
        max_steps=3,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        accelerator="cpu",
    )
    trainer.fit(module, DataLoader([batch] * 3, batch_size=None))
    with torch.no_grad():  # spoil the EMA: the plain weights must now win
        for p in module.codec.parameters():
            p.add_(0.02 * torch.randn_like(p))
    metrics = trainer.validate(module, DataLoader([batch], batch_size=None), verbose=False)[0]
    assert metrics["val/plain/loss"] < metrics["val/ema/loss"]
    assert metrics["val/loss"] == metrics["val/plain/loss"] and module.kept == "plain"

    def flat(part) -> torch.Tensor:
        return torch.cat([p.detach().flatten() for p in part.parameters()])

    trainer.save_checkpoint(tmp_path / "last.ckpt")
    assert torch.equal(flat(load_codec(tmp_path / "last.ckpt")), flat(module.online))
    # Resuming and warm starts get the EMA back where training keeps it.
    for restore in ("resume", "ckpt"):
        fresh = hydra.utils.instantiate(cfg.model)
        if restore == "resume":
            checkpoint = torch.load(tmp_path / "last.ckpt", weights_only=True)
            fresh.on_load_checkpoint(checkpoint)
            fresh.load_state_dict(checkpoint["state_dict"])
            assert fresh.kept == "plain"
        else:
            fresh.init_weights_from(tmp_path / "last.ckpt")
        assert torch.equal(flat(fresh.codec), flat(module.codec))
        assert torch.equal(flat(fresh.online), flat(module.online))


def test_ms_ssim_training_is_an_option(compose_train):
    cfg = compose_train(
        "model=qres17m", *TINY_RUN, "model.metric=ms-ssim", "model.lmbda=8", tiny=False
    )
    module = hydra.utils.instantiate(cfg.model)
    x = torch.rand(1, 3, 192, 192, generator=torch.Generator().manual_seed(0))
    out = module.online(x)
    terms = module.rd_loss(x, out)
    rate = out.total_bits() * math.log(2) / x[0].numel()
    expected = rate + 8 * (1 - ms_ssim(x, out.x_hat.clamp(0, 1)))
    assert float(terms.loss) == pytest.approx(float(expected), rel=1e-4)
    terms.loss.backward()
    assert all(
        torch.isfinite(p.grad).all() for p in module.online.parameters() if p.grad is not None
    )
    with pytest.raises(ConfigError, match="data.crop"):
        small = x[..., :64, :64]
        module.rd_loss(small, module.online(small))
    assert compressai_lmbda(8, "ms-ssim") == pytest.approx(34.62, abs=0.01)
    cfg = compose_train("model=qres17m", *TINY_RUN, "model.metric=nll", tiny=False)
    with pytest.raises(InstantiationException, match="one of \\('mse', 'ms-ssim'\\)"):
        hydra.utils.instantiate(cfg.model)


def test_mixed_precision_clips_and_judges_unscaled_gradients(compose_train, photo):
    """Under a 16-bit grad scaler (here CPU's, scale 1024) the norm the guard records and the
    clip acts on are those of the unscaled gradients: close to a 32-bit run's, not 1024x."""
    cfg = compose_train("model=qres17m", *TINY_RUN, tiny=False)
    batch = photo.expand(2, -1, -1, -1).contiguous()
    norms = {}
    for name in ("32-true", "16-mixed"):
        torch.manual_seed(0)
        module = hydra.utils.instantiate(cfg.model)
        plugins = []
        if name == "16-mixed":
            scaler = torch.amp.GradScaler("cpu", init_scale=1024.0)
            plugins = [MixedPrecision("16-mixed", "cpu", scaler)]
        trainer = pl.Trainer(
            max_steps=1,
            plugins=plugins,
            logger=False,
            enable_checkpointing=False,
            enable_progress_bar=False,
            enable_model_summary=False,
            accelerator="cpu",
        )
        trainer.fit(module, DataLoader([batch], batch_size=None))
        norms[name] = module.grad_norms[0]
        assert module.grad_scale() == (1.0 if name == "32-true" else 1024.0)
    assert norms["16-mixed"] == pytest.approx(norms["32-true"], rel=0.05)
    # The clip itself: gradients 1024x too large are clipped as if unscaled.
    module = hydra.utils.instantiate(cfg.model)
    for p in module.online.parameters():
        p.grad = torch.full_like(p, 1.0)
    unscaled = module.unscaled_clip(1.0)
    for p in module.online.parameters():
        p.grad = torch.full_like(p, 1024.0)
    assert module.unscaled_clip(1024.0) == pytest.approx(unscaled)
    clipped = torch.cat([p.grad.flatten() for p in module.online.parameters()])
    assert float(clipped.norm()) == pytest.approx(2.0 * 1024, rel=1e-3)  # 2.0 after unscaling
