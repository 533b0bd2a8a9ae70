"""OmegaConf resolvers the configs use; `register()` is idempotent."""

from __future__ import annotations

from pathlib import Path

from omegaconf import OmegaConf

from src.errors import ConfigError
from src.losses.rate_distortion import lmbda_for
from src.utils import cluster


def _run_group(default: str) -> str:
    """The sweep directory's name inside a multirun (one group per sweep), else `default`."""
    try:
        from hydra.core.hydra_config import HydraConfig
        from hydra.types import RunMode

        hydra_cfg = HydraConfig.get()
        if hydra_cfg.mode == RunMode.MULTIRUN:
            return Path(hydra_cfg.sweep.dir).name
    except ValueError:  # no Hydra context (tests composing the config by hand)
        pass
    return default


def _by_stage(stage: int | str | None, *values: object) -> object:
    """`${by_stage:${stage},a,b,c}`: the value of training stage 1, 2, 3 ... (null: stage 1), for
    presets whose stages differ (QVRF's 2000 / 500 / 500 epochs)."""
    index = 1 if stage is None else int(stage)
    if not 1 <= index <= len(values):
        raise ConfigError(f"stage={stage}: this preset has stages 1..{len(values)}")
    return values[index - 1]


def _run_tag(lmbda: object, stage: object) -> str:
    """The run name's tail: `_lmbda<λ>` for a fixed-rate run, `_stage<s>` for a staged one (QVRF
    trains every λ at once, so it has a stage and no λ)."""
    tag = "" if lmbda is None else f"_lmbda{lmbda}"
    return tag + ("" if stage is None else f"_stage{stage}")


def register() -> None:
    """Register `lmbda_ladder`, `run_group`, `by_stage`, `run_tag` and the cluster resolvers
    once per process."""
    cluster.register()
    resolvers = {
        "lmbda_ladder": lambda metric, quality: lmbda_for(metric, int(quality)),
        "run_group": _run_group,
        "by_stage": _by_stage,
        "run_tag": _run_tag,
    }
    for name, fn in resolvers.items():
        if not OmegaConf.has_resolver(name):
            OmegaConf.register_new_resolver(name, fn)


# On import as well: a submitit job unpickles train.py's task function (which references this
# module) and composes the sweep config before any of the framework's code runs.
register()
