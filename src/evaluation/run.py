"""What `python evaluate.py` does with a composed config."""

from __future__ import annotations

from pathlib import Path

import hydra
import torch
from omegaconf import DictConfig
from rich.console import Console
from rich.progress import track
from rich.table import Table

from src.codecs.loading import load_codec
from src.evaluation.evaluate import evaluate_image, summarize, write_results

SHOWN = (
    "bpp",
    "psnr",
    "ms_ssim",
    "delta_psnr_vs_jpeg_db",
    "rate_vs_jpeg_percent",
    "real_over_estimated",
    "encoding_time",
    "decoding_time",
    "all_match_forward",
)


def summary_table(title: str, summary: dict) -> Table:
    """One row of the headline figures."""
    table = Table(title=f"{title}  ({summary['images']} images)")
    for key in SHOWN:
        table.add_column(key)
    table.add_row(
        *[f"{summary[k]:.4f}" if isinstance(summary[k], float) else str(summary[k]) for k in SHOWN]
    )
    return table


def evaluate(cfg: DictConfig, ckpts: list[str]) -> dict[str, dict]:
    """Evaluate each checkpoint on the test images of `cfg.data`; returns the summaries."""
    if cfg.get("threads"):
        torch.set_num_threads(int(cfg.threads))
    datamodule = hydra.utils.instantiate(cfg.data)
    if hasattr(datamodule, "prepare_data"):
        datamodule.prepare_data()
    datamodule.setup("test")
    images = list(datamodule.test_dataloader())
    names = [p.name for p in datamodule.val_paths]
    out_dir = Path(cfg.paths.output_dir)
    console = Console()
    summaries = {}
    for ckpt in ckpts:
        codec = load_codec(ckpt, device=cfg.device)
        name = f"{codec.name}-{Path(ckpt).parent.parent.name}-{Path(ckpt).stem}"
        results = [
            evaluate_image(codec, x.to(cfg.device), n)
            for x, n in track(
                list(zip(images, names)), description=f"coding with {Path(ckpt).name}"
            )
        ]
        summary = summarize(results)
        write_results(results, summary, name, out_dir)
        summaries[ckpt] = summary
        console.print(summary_table(ckpt, summary))
    console.print(f"results written to {out_dir}")
    return summaries
