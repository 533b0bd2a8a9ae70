"""Real (tiny) training runs: every preset learns, the default run leaves coding-ready checkpoints."""

from __future__ import annotations

import hydra
import pytest
import pytorch_lightning as pl
import torch

from src.codecs.loading import load_codec
from src.datamodules.images import decode_rgb
from src.training import train
from src.utils.checkpoints import read_checkpoint
from tests.helpers import fit_on_repeated_batch
from tests.test_configs import MODELS


class RecordLoss(pl.Callback):
    def __init__(self) -> None:
        self.losses: list[float] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.losses.append(float(outputs["loss"] if isinstance(outputs, dict) else outputs))


@pytest.fixture(scope="module")
def photo_batch(sample_root) -> torch.Tensor:
    """Two 64×64 crops of a real photo."""
    img = decode_rgb(next((sample_root / "train").glob("*astronaut*"))).float().div(255)
    return torch.stack([img[:, 100:164, 100:164], img[:, 300:364, 200:264]])


# Presets that need other settings to learn one batch in 15 steps (LAMB moves each tensor by
# lr·‖w‖ per step; small codebooks keep the step fast; McQuic's augmentations and erasing would
# make the repeated batch a different one every step).
FAST = {
    "mcquic": [
        "model.codec.codebook_sizes=[16,8,4]",
        "model.optimizer.lr=2e-2",
        "model.augment=null",
        "model.erasing=null",
    ]
}
# HiFIC needs a regime and LPIPS weights (tests/test_hific.py trains both of its stages); a
# lossless preset's loss is the pixels' code length, which 15 steps cannot cut by 10 %
# (tests/test_qres_vae.py and tests/test_irec.py train those).
TRAINABLE = [m for m in MODELS if not m.startswith("hific") and "lossless" not in m]


@pytest.mark.parametrize("model", TRAINABLE)
def test_every_preset_lowers_its_loss_on_a_repeated_batch(compose_train, photo_batch, model):
    cfg = compose_train(
        f"model={model}", "lr_schedule=constant", "model.optimizer.lr=2e-3", *FAST.get(model, [])
    )
    pl.seed_everything(0)
    module = hydra.utils.instantiate(cfg.model)
    recorder = RecordLoss()
    trainer = fit_on_repeated_batch(module, photo_batch, 15, 15, recorder)
    assert trainer.global_step == 15  # the auxiliary step does not count as a training step
    first, last = sum(recorder.losses[:3]) / 3, sum(recorder.losses[-3:]) / 3
    assert last < 0.9 * first, recorder.losses


def test_default_run_writes_best_and_last_coding_ready_checkpoints(compose_train, tmp_path, capsys):
    cfg = compose_train()
    metrics = train(cfg)
    assert "val/psnr" in metrics and "val/bpp" in metrics
    # The real-bitrate monitor coded a 64x64 validation crop for real: the file (its header
    # alone is over 300 bits) beside the estimate of a barely trained model.
    assert metrics["val/real_bpp"] > 300 / 64**2
    assert metrics["val/real_over_estimated"] == pytest.approx(
        metrics["val/real_bpp"] / metrics["val/estimated_bpp"]
    )
    ckpt_dir = tmp_path / "run" / "checkpoints"
    assert (ckpt_dir / "best.ckpt").is_file() and (ckpt_dir / "last.ckpt").is_file()
    last = read_checkpoint(ckpt_dir / "last.ckpt")
    assert last["global_step"] == cfg.trainer.max_steps
    assert last["codec_name"] == "bmshj2018-hyperprior"
    # The CDF tables were built before saving: a fresh codec codes straight from the file.
    assert any(
        k.endswith("_quantized_cdf") and v.numel() > 1 for k, v in last["state_dict"].items()
    )
    codec = load_codec(ckpt_dir / "last.ckpt")
    x = torch.rand(1, 3, 50, 70)
    assert codec.decompress(codec.compress(x)).shape == x.shape
    out = capsys.readouterr().out
    assert "python evaluate.py ckpt=" in out and "best.ckpt" in out
    steps = cfg.trainer.max_steps
    assert f"Trained:         {steps} of {steps} steps (trainer.max_steps reached)" in out
    logged = (tmp_path / "run" / "csv" / "metrics.csv").read_text()
    header = logged.splitlines()[0].split(",")
    assert {"train/loss", "train/bpp", "train/aux_loss", "train/lr", "val/psnr"} <= set(header)
    steps_with_train_loss = [
        row.split(",")[header.index("step")]
        for row in logged.splitlines()[1:]
        if row.split(",")[header.index("train/loss")]
    ]
    assert steps_with_train_loss == [
        "1",
        "3",
    ]  # every log_every_n_steps=2, Lightning's 0-based step


def test_closing_line_says_when_the_time_cap_ended_the_run(monkeypatch):
    from types import SimpleNamespace

    from pytorch_lightning.callbacks import Timer

    from src.training import training_length

    timer = Timer(duration="00:00:15:00")
    monkeypatch.setattr(timer, "time_elapsed", lambda stage: 900.0)
    monkeypatch.setattr(timer, "time_remaining", lambda stage: 0.0)
    trainer = SimpleNamespace(global_step=1234, max_steps=4500, callbacks=[timer])
    assert training_length(trainer) == (
        "1234 of 4500 steps in 15.0 min (stopped by trainer.max_time)"
    )
