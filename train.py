"""Train a learned image codec: `python train.py [model=...] [data=...] [key=value ...]`."""

from __future__ import annotations

import sys

import hydra
from hydra.errors import InstantiationException
from omegaconf import DictConfig

from src.errors import LicError
from src.utils.resolvers import register

register()


@hydra.main(version_base="1.3", config_path="conf", config_name="train")
def main(cfg: DictConfig) -> None:
    from src.training import train

    try:
        train(cfg)
    except (LicError, InstantiationException) as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
