"""Shared fixtures: compose the real configs, shrunk to tiny widths and crops, in tmp dirs."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, open_dict

from src.datamodules.sample import gather_sample_photos
from src.utils.resolvers import register
from tests.helpers import REPO, TINY

register()
torch.set_num_threads(2)


@pytest.fixture(scope="session")
def sample_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The built-in sample photos, gathered once per test session."""
    return gather_sample_photos(tmp_path_factory.mktemp("data") / "sample")


@pytest.fixture(scope="module")
def one_thread():
    """Tiny models gain nothing from threads, and on a busy machine two threads spinning on two
    shared cores make each small convolution many times slower. Modules opt in with
    `pytestmark = pytest.mark.usefixtures("one_thread")`."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def compose_config(
    out_dir: Path, sample_root: Path, *overrides: str, tiny: bool = True, sample_data: bool = True
) -> DictConfig:
    """The train config as `python train.py` composes it, writing its run into `out_dir/run`.

    `sample_data=False` leaves `data.root` alone (a preset that picks its own data group)."""
    GlobalHydra.instance().clear()
    base = [
        f"paths.log_dir={out_dir}/logs",
        f"paths.data_dir={out_dir}/data",
        f"hydra.run.dir={out_dir}/run",
    ]
    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        cfg = compose(
            "train",
            overrides=base + (TINY if tiny else []) + list(overrides),
            return_hydra_config=True,
        )
    HydraConfig.instance().set_config(cfg)
    with open_dict(cfg):
        cfg.paths.output_dir = str(out_dir / "run")
        # The sample photos, for data presets that read a folder (an LMDB preset has no root).
        given = any(o.startswith("data.root=") for o in overrides)
        if sample_data and "root" in cfg.data and not given:
            cfg.data.root = str(sample_root)
    GlobalHydra.instance().clear()
    return cfg


@pytest.fixture
def compose_train(tmp_path: Path, sample_root: Path):
    """compose_train(*overrides) -> the train config, tiny, writing under tmp_path."""

    def _compose(*overrides: str, tiny: bool = True, sample_data: bool = True) -> DictConfig:
        return compose_config(tmp_path, sample_root, *overrides, tiny=tiny, sample_data=sample_data)

    return _compose


def tiny_args(tmp_path: Path, sample_root: Path) -> list[str]:
    """Command-line overrides for a tiny subprocess run under tmp_path."""
    return [
        f"paths.log_dir={tmp_path}/logs",
        f"data.root={sample_root}",
        *TINY,
    ]
