"""Evaluate trained codecs by real entropy coding: `python evaluate.py ckpt=RUN/checkpoints/best.ckpt`."""

from __future__ import annotations

import hydra
from omegaconf import DictConfig, ListConfig

from src.utils.cli import run_entry_point
from src.utils.resolvers import register

register()


@hydra.main(version_base="1.3", config_path="conf", config_name="evaluate")
def main(cfg: DictConfig) -> None:
    from src.evaluation.run import evaluate

    ckpts = list(cfg.ckpt) if isinstance(cfg.ckpt, ListConfig) else [cfg.ckpt]
    evaluate(cfg, [str(c) for c in ckpts])


if __name__ == "__main__":
    run_entry_point(main)
