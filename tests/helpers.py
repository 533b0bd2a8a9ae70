"""Test-only callbacks and helpers, importable by subprocess runs as `tests.helpers`."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytorch_lightning as pl
import torch
from torch.utils.data import DataLoader

REPO = Path(__file__).resolve().parents[1]

# Shrinks any RD preset to something a CPU trains in seconds.
TINY = [
    "model.codec.N=8",
    "data.crop=64",
    "data.val_crop=64",
    "data.batch_size=2",
    "data.val_batch_size=2",
    "data.repeat=2",
    "trainer.max_steps=4",
    "trainer.val_check_interval=2",
    "trainer.limit_val_batches=1",
    "trainer.log_every_n_steps=2",
    "trainer.max_time=null",
    "callbacks.model_summary=null",
    "model.num_logged_images=1",
    "logger=csv",
]


def run_script(script: str, args: list[str], timeout: int = 300) -> subprocess.CompletedProcess:
    """Run `python script args` in the repository, as a user would; returns the finished process."""
    env = {k: v for k, v in os.environ.items() if k != "HYDRA_FULL_ERROR"}
    env["PYTHONUNBUFFERED"] = "1"
    return subprocess.run(
        [sys.executable, script, *args],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def fit_on_repeated_batch(
    module: pl.LightningModule, batch: torch.Tensor, max_steps: int, repeats: int, callback
) -> pl.Trainer:
    """Train `module` on the CPU for `max_steps` on `batch` repeated `repeats` times, with no
    logger, checkpoint, progress bar or summary; returns the finished trainer."""
    trainer = pl.Trainer(
        max_steps=max_steps,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[callback],
        accelerator="cpu",
    )
    trainer.fit(module, DataLoader([batch] * repeats, batch_size=None))
    return trainer


class DieAtStep(pl.Callback):
    """Kill the process abruptly (no clean-up, like a pre-empted job) once `step` is reached."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if trainer.global_step >= self.step:
            os._exit(17)


class DumpStartState(pl.Callback):
    """Save the optimiser states and step as training starts (to compare with a checkpoint)."""

    def __init__(self, path: str) -> None:
        self.path = path

    def on_train_start(self, trainer, pl_module) -> None:
        torch.save(
            {
                "global_step": trainer.global_step,
                "optimizer_states": [o.state_dict() for o in trainer.optimizers],
                "lr": trainer.optimizers[0].param_groups[0]["lr"],
            },
            self.path,
        )


class PauseAtStep(pl.Callback):
    """Once `step` is reached, write `marker` and wait there for the test to kill the process."""

    def __init__(self, step: int, marker: str) -> None:
        self.step = step
        self.marker = marker

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if trainer.global_step >= self.step:
            Path(self.marker).write_text(str(trainer.global_step))
            while True:
                time.sleep(1)


class DumpFinalState(pl.Callback):
    """Save the module's state dict and the step as fit ends (to compare two runs)."""

    def __init__(self, path: str) -> None:
        self.path = path

    def on_train_end(self, trainer, pl_module) -> None:
        torch.save({"global_step": trainer.global_step, "state": pl_module.state_dict()}, self.path)


FIXTURES = REPO / "tests" / "fixtures"


def fixture_path(family: str, name: str) -> Path:
    """A parity fixture file (see tests/fixtures/README.md); fails the test clearly if absent."""
    path = FIXTURES / family / name
    if not path.is_file():
        raise FileNotFoundError(f"parity fixture {path} is missing (see tests/fixtures/README.md)")
    return path


def compose_evaluate(out_dir: Path, *overrides: str):
    """The evaluate config as `python evaluate.py` composes it, writing into `out_dir/eval`."""
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra
    from hydra.core.hydra_config import HydraConfig
    from omegaconf import open_dict

    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        cfg = compose(
            "evaluate",
            overrides=[f"hydra.run.dir={out_dir}/eval", *overrides],
            return_hydra_config=True,
        )
    HydraConfig.instance().set_config(cfg)
    with open_dict(cfg):
        cfg.paths.output_dir = str(out_dir / "eval")
    GlobalHydra.instance().clear()
    return cfg
