"""Every preset composes, and every model / trainer / logger preset instantiates on CPU."""

from __future__ import annotations

import hydra
import pytest

from src.codecs.base import Codec
from src.lightning_modules.rate_distortion import RateDistortion
from tests.helpers import REPO

MODELS = sorted(p.stem for p in (REPO / "conf" / "model").glob("*.yaml"))
TRAINERS = sorted(p.stem for p in (REPO / "conf" / "trainer").glob("*.yaml"))
LOGGERS = sorted(p.stem for p in (REPO / "conf" / "logger").glob("*.yaml"))
EXPERIMENTS = sorted(p.stem for p in (REPO / "conf" / "experiment").glob("*.yaml"))
SCHEDULES = sorted(p.stem for p in (REPO / "conf" / "lr_schedule").glob("*.yaml"))


def test_the_menus_are_complete():
    assert {
        "bmshj2018_factorized",
        "bmshj2018_hyperprior",
        "mbt2018_mean",
        "mbt2018",
        "cheng2020_anchor",
        "cheng2020_attn",
    } <= set(MODELS)
    assert {"default", "cpu", "gpu", "ddp", "ddp_cpu"} <= set(TRAINERS)
    assert {"tensorboard", "wandb", "csv"} <= set(LOGGERS)


@pytest.mark.parametrize("model", MODELS)
def test_every_model_preset_builds(compose_train, model):
    cfg = compose_train(f"model={model}")
    module = hydra.utils.instantiate(cfg.model)
    assert isinstance(module, RateDistortion)
    assert isinstance(module.codec, Codec)
    if "quality" in cfg.model.codec:  # families without quality levels have neither
        assert cfg.model.codec.quality == cfg.model.quality


@pytest.mark.parametrize("trainer", TRAINERS)
def test_every_trainer_preset_composes(compose_train, trainer):
    cfg = compose_train(f"trainer={trainer}")
    assert cfg.trainer._target_ == "pytorch_lightning.Trainer"
    if trainer in ("default", "cpu"):
        hydra.utils.instantiate(cfg.trainer, logger=False)


@pytest.mark.parametrize("logger", LOGGERS)
def test_every_logger_preset_instantiates(compose_train, logger, monkeypatch, tmp_path):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    cfg = compose_train(f"logger={logger}")
    loggers = [hydra.utils.instantiate(c) for c in cfg.logger.values()]
    assert len(loggers) == 1


def test_several_loggers_at_once(compose_train):
    cfg = compose_train("logger=[tensorboard,csv]")
    assert set(cfg.logger) == {"tensorboard", "csv"}


@pytest.mark.parametrize("experiment", EXPERIMENTS)
def test_every_experiment_composes(compose_train, experiment):
    cfg = compose_train(f"experiment={experiment}", tiny=False, sample_data=False)
    hydra.utils.instantiate(cfg.model)


def test_every_experiment_has_its_own_run_name(compose_train):
    names = [
        compose_train(f"experiment={e}", tiny=False, sample_data=False).run_name
        for e in EXPERIMENTS
    ]
    plain = {compose_train(f"model={m}", tiny=False).run_name for m in MODELS}
    assert len(set(names)) == len(names) and not set(names) & plain, names
    assert all(name.startswith(e) for e, name in zip(EXPERIMENTS, names)), names


@pytest.mark.parametrize("schedule", SCHEDULES)
def test_every_lr_schedule_builds(compose_train, schedule):
    cfg = compose_train(f"lr_schedule={schedule}")
    module = hydra.utils.instantiate(cfg.model)
    module.configure_optimizers()


def test_quality_picks_compressai_lambda_and_widths(compose_train):
    cfg = compose_train("model=mbt2018_mean", "model.quality=5", "model.codec.N=null", tiny=False)
    assert cfg.model.lmbda == pytest.approx(0.0250)
    cfg = compose_train(
        "model=bmshj2018_hyperprior",
        "model.quality=7",
        "model.codec.N=null",
        "model.codec.M=null",
        "experiment=paper",
        tiny=False,
    )
    codec = hydra.utils.instantiate(cfg.model.codec)
    assert (codec.net.N, codec.net.M) == (192, 320)
    cfg = compose_train("model.metric=ms-ssim", "model.quality=1")
    assert cfg.model.lmbda == pytest.approx(2.40)
    cfg = compose_train("model.lmbda=0.0130")
    assert cfg.model.lmbda == pytest.approx(0.0130)


@pytest.mark.parametrize("model", MODELS)
def test_every_model_trainer_logger_combination_composes(compose_train, model):
    for trainer in TRAINERS:
        for logger in LOGGERS:
            cfg = compose_train(f"model={model}", f"trainer={trainer}", f"logger={logger}")
            assert cfg.model.codec._target_ and cfg.trainer.accelerator and logger in cfg.logger
