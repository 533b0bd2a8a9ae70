"""Resuming: last.ckpt is the newest state, a run killed with SIGKILL resumes bit for bit, and
`resume=true` continues the run directory it is pointed at."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import hydra
import pytest
import pytorch_lightning as pl
import torch
from omegaconf import OmegaConf
from torch import nn
from torch.utils.data import DataLoader

from src.errors import CheckpointError
from src.training import resume_checkpoint
from src.utils.checkpoints import read_checkpoint
from tests.helpers import REPO

pytestmark = pytest.mark.usefixtures("one_thread")


# ---- last.ckpt --------------------------------------------------------------------------------
class ScriptedValidation(pl.LightningModule):
    """A one-weight model whose validations report the losses it is given, in turn."""

    def __init__(self, val_losses: list[float]) -> None:
        super().__init__()
        self.layer = nn.Linear(1, 1)
        self.val_losses = list(val_losses)

    def training_step(self, batch, batch_idx):
        return self.layer(batch).pow(2).mean()

    def validation_step(self, batch, batch_idx) -> None:
        pass

    def on_validation_epoch_end(self) -> None:
        self.log("val/loss", self.val_losses.pop(0))

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


class LastStepAtBatchStart(pl.Callback):
    """The step `last.ckpt` holds as each batch starts."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.seen: dict[int, int] = {}

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if self.path.is_file():
            self.seen[trainer.global_step] = read_checkpoint(self.path)["global_step"]


def test_last_checkpoint_follows_every_validation_and_the_end_of_fit(tmp_path):
    # The configured checkpoint callback, as `python train.py` builds it.
    settings = OmegaConf.load(REPO / "conf" / "callbacks" / "default.yaml").model_checkpoint
    settings.dirpath = str(tmp_path / "checkpoints")
    checkpoint = hydra.utils.instantiate(settings)
    watch = LastStepAtBatchStart(tmp_path / "checkpoints" / "last.ckpt")
    trainer = pl.Trainer(
        max_steps=7,
        val_check_interval=2,
        check_val_every_n_epoch=None,
        num_sanity_val_steps=0,
        callbacks=[checkpoint, watch],
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        accelerator="cpu",
        default_root_dir=tmp_path,
    )
    data = DataLoader(torch.ones(10, 1), batch_size=1)
    # val/loss improves at step 4, not at step 6.
    trainer.fit(ScriptedValidation([1.0, 0.5, 0.7]), data, data)
    assert watch.seen[2] == 2 and watch.seen[4] == 4
    assert watch.seen[6] == 6  # written although step 6 did not improve val/loss
    assert read_checkpoint(tmp_path / "checkpoints" / "last.ckpt")["global_step"] == 7
    assert read_checkpoint(tmp_path / "checkpoints" / "best.ckpt")["global_step"] == 4


# ---- resume=true in a given run directory -----------------------------------------------------
def test_resume_true_continues_the_run_directory_it_runs_in(compose_train, tmp_path):
    cfg = compose_train("resume=true")
    with pytest.raises(CheckpointError, match="resume=true found no checkpoints/last.ckpt"):
        resume_checkpoint(cfg)
    last = Path(cfg.paths.output_dir) / "checkpoints" / "last.ckpt"
    last.parent.mkdir(parents=True)
    torch.save({"state_dict": {}, "global_step": 3}, last)
    assert resume_checkpoint(cfg) == str(last)
    cfg.resume = False  # without resume=true a finished run's directory starts afresh
    assert resume_checkpoint(cfg) is None


# ---- exact resume after SIGKILL ---------------------------------------------------------------
# 9 training photos, one 32 px crop each per epoch, batch 2: epochs of 4 batches.
TINY_RESUME = [
    "data.crop=32",
    "data.val_crop=32",
    "data.batch_size=2",
    "data.val_batch_size=2",
    "data.repeat=1",
    "trainer.limit_val_batches=1",
    "trainer.max_time=null",
    "callbacks.model_summary=null",
    "callbacks.progress_bar=null",
    "callbacks.real_bitrate=null",
    "model.num_logged_images=0",
    "logger=csv",
]
# Validations (and checkpoints) every 3 batches; killed after step 7, so the run resumes from
# step 6, in the middle of an epoch. The plateau schedule halves the rate at every epoch end
# (threshold 1: nothing counts as an improvement), so the end of epoch 2, before the resumed
# run's first validation, shows whether the checkpoint's val/loss was restored.
RATE_DISTORTION = [
    "model.codec.N=8",
    "lr_schedule=plateau",
    "model.scheduler.patience=0",
    "++model.scheduler.threshold=1.0",
    "trainer.max_steps=12",
    "trainer.val_check_interval=3",
]
# HiFIC stage B: D and G take turns, so 6 generator steps are 12 batches; validations every
# 4 batches (generator steps 2, 4, 6). Killed after step 5, it resumes from step 4, the end of
# an epoch.
HIFIC_STAGE_B = [
    "model=hific",
    "regime=low",
    "model.codec.N=4",
    "model.codec.M=8",
    "model.codec.hyper_channels=8",
    "model.n_residual_blocks=1",
    "model.disc_channels=[4,4,4,4]",
    "model.disc_latent_embedding=2",
    "model.lpips_weights=random",
    "trainer.max_steps=6",
    "trainer.val_check_interval=4",
]
CASES = {
    "rate_distortion": (RATE_DISTORTION, 7, 6),
    "hific_stage_b": (HIFIC_STAGE_B, 5, 4),
    "rate_distortion_2_workers": ([*RATE_DISTORTION, "data.num_workers=2"], 7, 6),
}


def start_train(args: list[str], log: Path) -> subprocess.Popen:
    """`python train.py args` in a process group of its own (so its loader workers die with it)."""
    env = {k: v for k, v in os.environ.items() if k != "HYDRA_FULL_ERROR"}
    env["OMP_NUM_THREADS"] = "1"  # the same arithmetic in every run
    with log.open("w") as out:
        return subprocess.Popen(
            [sys.executable, "train.py", *args],
            cwd=REPO,
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )


def finish(proc: subprocess.Popen, log: Path, timeout: float = 300) -> None:
    assert proc.wait(timeout=timeout) == 0, log.read_text()[-3000:]


@pytest.mark.parametrize(
    "case",
    [
        "rate_distortion",
        "hific_stage_b",
        pytest.param("rate_distortion_2_workers", marks=pytest.mark.slow),
    ],
)
def test_a_run_killed_with_sigkill_resumes_bit_for_bit(tmp_path, sample_root, case):
    overrides, kill_after, checkpoint_step = CASES[case]
    args = [*TINY_RESUME, *overrides, f"data.root={sample_root}", f"paths.log_dir={tmp_path}/logs"]
    run_dir = tmp_path / "run"
    dumps = {name: tmp_path / f"{name}.pt" for name in ("uninterrupted", "resumed")}
    dump = "+callbacks.dump._target_=tests.helpers.DumpFinalState"

    def dump_to(name: str) -> list[str]:
        return [dump, f"+callbacks.dump.path={dumps[name]}"]

    uninterrupted_log = tmp_path / "uninterrupted.log"
    uninterrupted = start_train(
        [*args, f"hydra.run.dir={tmp_path}/uninterrupted", *dump_to("uninterrupted")],
        uninterrupted_log,
    )
    marker = tmp_path / "paused"
    killed = start_train(
        [
            *args,
            f"hydra.run.dir={run_dir}",
            "+callbacks.pause._target_=tests.helpers.PauseAtStep",
            f"+callbacks.pause.step={kill_after}",
            f"+callbacks.pause.marker={marker}",
        ],
        tmp_path / "killed.log",
    )
    deadline = time.monotonic() + 300
    while not marker.exists():
        assert killed.poll() is None, (tmp_path / "killed.log").read_text()[-3000:]
        assert time.monotonic() < deadline, "the run never reached the step to kill it at"
        time.sleep(0.1)
    os.killpg(killed.pid, signal.SIGKILL)
    killed.wait()
    last = run_dir / "checkpoints" / "last.ckpt"
    assert read_checkpoint(last)["global_step"] == checkpoint_step  # the work after it is lost

    resumed_log = tmp_path / "resumed.log"
    resumed = start_train(
        [*args, f"hydra.run.dir={run_dir}", "resume=true", *dump_to("resumed")], resumed_log
    )
    finish(resumed, resumed_log)
    finish(uninterrupted, uninterrupted_log)
    assert f"continuing the run in {run_dir} from {last}" in resumed_log.read_text()

    want, got = (torch.load(dumps[name], weights_only=True) for name in dumps)
    assert got["global_step"] == want["global_step"] > checkpoint_step
    assert got["state"].keys() == want["state"].keys()
    differing = [k for k, v in want["state"].items() if not torch.equal(got["state"][k], v)]
    assert not differing, f"{len(differing)} tensors differ, e.g. {differing[:3]}"
