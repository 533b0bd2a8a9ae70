"""What `python train.py` does with a composed config: build, (re)load, fit, report."""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

import hydra
import pytorch_lightning as pl
from omegaconf import DictConfig, OmegaConf
from pytorch_lightning.callbacks import Timer
from pytorch_lightning.utilities import rank_zero_info

from src.errors import ConfigError
from src.utils.checkpoints import (
    interrupted_checkpoints,
    newest_last_checkpoint,
    newest_state,
    read_checkpoint,
)
from src.utils.cluster import adopt_submitit_local_tasks, cluster_plugins, effective_batch_size
from src.utils.resume import ResumeExactly

log = logging.getLogger(__name__)


def instantiate_group(group: DictConfig | None) -> list[Any]:
    """Instantiate every entry of a callbacks/loggers group that has a `_target_`."""
    if not group:
        return []
    return [hydra.utils.instantiate(c) for c in group.values() if c and "_target_" in c]


def check_writable(directory: str | Path) -> Path:
    """Create `directory` if needed and make sure files can be written there."""
    directory = Path(directory)
    try:
        directory.mkdir(parents=True, exist_ok=True)
        probe = directory / ".write_test"
        probe.write_text("ok")
        probe.unlink()
    except OSError as err:
        raise ConfigError(f"output directory {directory} is not writable ({err.strerror})") from err
    return directory


def resume_checkpoint(cfg: DictConfig) -> str | None:
    """The checkpoint to continue from, if any.

    A run directory that already holds a signal checkpoint (`hpc_ckpt_<n>.ckpt`: a requeued
    SLURM job, or a stopped run started again in its directory) continues from its newest state,
    whatever `resume=` says. Otherwise `resume=` decides: a path, or with `true` the newest state
    of this run directory (a cluster job that sets `hydra.run.dir` itself) or else of the latest
    run of the same name.
    """
    output_dir = Path(cfg.paths.output_dir)
    own_state = newest_state(output_dir)
    if interrupted_checkpoints(output_dir) or (cfg.resume is True and own_state is not None):
        read_checkpoint(own_state)
        log.info("continuing the run in %s from %s", output_dir, own_state)
        return str(own_state)
    if cfg.resume in (None, False):
        return None
    if cfg.resume is True:
        runs_dir = Path(cfg.paths.log_dir) / cfg.task_name / "runs" / cfg.run_name
        path = newest_last_checkpoint(runs_dir, exclude=cfg.paths.output_dir)
    else:
        path = Path(str(cfg.resume))
    read_checkpoint(path)  # fail early and clearly on a missing or unreadable file
    log.info("resuming from %s", path)
    return str(path)


def train(cfg: DictConfig, extra_callbacks: list[pl.Callback] | None = None) -> dict[str, float]:
    """Fit the configured recipe on the configured data; returns the last logged metrics.

    `extra_callbacks` join the configured ones (benchmarks and tests hook in this way).
    """
    output_dir = check_writable(cfg.paths.output_dir)
    adopt_submitit_local_tasks(int(cfg.trainer.get("num_nodes", 1)))
    if cfg.get("seed") is not None:
        pl.seed_everything(cfg.seed, workers=True)
    if cfg.ckpt and cfg.resume:
        raise ConfigError(
            "ckpt= (fresh start from weights) and resume= (continue a run) exclude each other"
        )

    datamodule: pl.LightningDataModule = hydra.utils.instantiate(cfg.data)
    model: pl.LightningModule = hydra.utils.instantiate(cfg.model)
    if cfg.ckpt:
        model.init_weights_from(cfg.ckpt)
        log.info("initialised weights from %s", cfg.ckpt)
    ckpt_path = resume_checkpoint(cfg)

    # ResumeExactly is not optional: without it a resumed run draws other noise than it would have.
    callbacks = [
        ResumeExactly(),
        *instantiate_group(cfg.get("callbacks")),
        *(extra_callbacks or []),
    ]
    loggers = instantiate_group(cfg.get("logger"))
    extra = {}
    if plugins := cluster_plugins(auto_requeue=bool(cfg.get("slurm_auto_requeue", True))):
        extra["plugins"] = plugins
    trainer: pl.Trainer = hydra.utils.instantiate(
        cfg.trainer, callbacks=callbacks, logger=loggers or False, **extra
    )
    config = OmegaConf.to_container(cfg, resolve=True)
    config["effective_batch_size"] = report_batch_size(trainer, cfg)
    for logger in trainer.loggers:
        logger.log_hyperparams(config)

    trainer.fit(model, datamodule=datamodule, ckpt_path=ckpt_path)

    metrics = {k: float(v) for k, v in trainer.callback_metrics.items() if v.numel() == 1}
    if cfg.print_summary and trainer.is_global_zero and trainer.checkpoint_callback is not None:
        print_summary(trainer, output_dir)
    return metrics


def report_batch_size(trainer: pl.Trainer, cfg: DictConfig) -> int | None:
    """Print and return the images per optimiser step (per-device batch × devices × nodes)."""
    batch_size = cfg.data.get("batch_size")
    if batch_size is None:
        return None
    total = effective_batch_size(
        batch_size, trainer.num_devices, trainer.num_nodes, trainer.accumulate_grad_batches
    )
    rank_zero_info(
        f"effective batch size {total} = {batch_size} per device × {trainer.num_devices} "
        f"device(s) × {trainer.num_nodes} node(s) × {trainer.accumulate_grad_batches} accumulated"
    )
    return total


def training_length(trainer: pl.Trainer) -> str:
    """How many steps the run made, in how long, and what stopped it."""
    steps, limit = trainer.global_step, trainer.max_steps
    timer = next((c for c in trainer.callbacks if isinstance(c, Timer)), None)
    text = f"{steps} of {limit} steps" if limit and limit > 0 else f"{steps} steps"
    if timer is not None:
        text += f" in {timer.time_elapsed('train') / 60:.1f} min"
    if limit and limit > 0 and steps >= limit:
        return text + " (trainer.max_steps reached)"
    if timer is not None and timer.time_remaining("train") <= 0:
        return text + " (stopped by trainer.max_time)"
    return text


def print_summary(trainer: pl.Trainer, output_dir: Path) -> None:
    """The closing lines: where the checkpoints are and how to evaluate them."""
    callback = trainer.checkpoint_callback
    last = Path(callback.last_model_path) if callback.last_model_path else None
    best = Path(callback.best_model_path) if callback.best_model_path else None
    # Unmonitored (HiFIC's stage B), "best" is only the newest state at a validation: take last.
    chosen = (best or last) if callback.monitor is not None else (last or best)
    print(f"\nRun directory:   {output_dir}")
    print(f"Trained:         {training_length(trainer)}")
    if last:
        print(f"Last checkpoint: {last}")
    if best:
        print(f"Best checkpoint: {best}")
    if chosen:
        root = Path(os.getcwd())
        shown = chosen.relative_to(root) if chosen.is_relative_to(root) else chosen
        print(f"Evaluate it:     python evaluate.py ckpt={shown}")
