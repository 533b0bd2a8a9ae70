"""Evaluate trained codecs by real entropy coding: `python evaluate.py ckpt=RUN/checkpoints/best.ckpt`."""

from __future__ import annotations

import sys

import hydra
from omegaconf import DictConfig, ListConfig

from src.errors import LicError
from src.utils.resolvers import register

register()


@hydra.main(version_base="1.3", config_path="conf", config_name="evaluate")
def main(cfg: DictConfig) -> None:
    from src.evaluation.run import evaluate

    ckpts = list(cfg.ckpt) if isinstance(cfg.ckpt, ListConfig) else [cfg.ckpt]
    try:
        evaluate(cfg, [str(c) for c in ckpts])
    except LicError as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
