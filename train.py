"""Train a learned image codec: `python train.py [model=...] [data=...] [key=value ...]`."""

from __future__ import annotations

import hydra
from omegaconf import DictConfig

from src.utils.cli import run_entry_point
from src.utils.resolvers import register

register()


@hydra.main(version_base="1.3", config_path="conf", config_name="train")
def main(cfg: DictConfig) -> None:
    # Referencing `register` makes a submitit job (which unpickles this function instead of
    # running this file) import src.utils.resolvers, which registers the resolvers on import.
    register()
    from src.training import train

    train(cfg)


if __name__ == "__main__":
    run_entry_point(main)
