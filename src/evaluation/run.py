"""What `python evaluate.py` does with a composed config."""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path

import hydra
import torch
from omegaconf import DictConfig
from rich.console import Console
from rich.progress import track
from rich.table import Table

from src.codecs.base import Codec
from src.codecs.loading import load_codec
from src.coding.container import Rate
from src.errors import CheckpointError
from src.evaluation.baselines import pillow_codec_curve
from src.evaluation.bd_rate import bd_rate
from src.evaluation.evaluate import evaluate_image, mean_curve, summarize, write_results
from src.evaluation.plot import plot_rd

SHOWN = (
    "bpp",
    "psnr",
    "ms_ssim",
    "delta_psnr_vs_jpeg_db",
    "rate_vs_jpeg_percent",
    "estimated_bpp",
    "real_over_estimated",
    "encoding_time",
    "decoding_time",
    "all_match_forward",
)


def summary_table(title: str, summary: dict) -> Table:
    """The headline figures of one checkpoint, one per row."""
    table = Table(title=f"{title}  ({summary['images']} images)", show_header=False)
    for key in SHOWN:
        value = summary[key]
        table.add_row(key, f"{value:.4f}" if isinstance(value, float) else str(value))
    return table


def expand_checkpoints(paths: list[str]) -> list[Path]:
    """Checkpoint files; a directory stands for every run's best (else last) checkpoint in it."""
    found = []
    for path in map(Path, paths):
        if not path.is_dir():
            found.append(path)
            continue
        runs = sorted({p.parent for p in path.rglob("checkpoints/*.ckpt")})
        if not runs:
            raise CheckpointError(f"no checkpoints/*.ckpt under {path}")
        found += [r / "best.ckpt" if (r / "best.ckpt").exists() else r / "last.ckpt" for r in runs]
    return found


def rate_points(codec: Codec, rate_cfg: DictConfig | None) -> list[Rate | None]:
    """The rate settings to evaluate a codec at: `rate.indices` (a list or "all") and
    `rate.factors` for a variable-rate codec, its single rate otherwise."""
    if codec.num_rates == 1:
        return [None]
    indices = (rate_cfg or {}).get("indices")
    factors = (rate_cfg or {}).get("factors")
    if indices is None and factors is None:
        indices = "all"
    if indices == "all":
        indices = range(codec.num_rates)
    points = [Rate.index(i) for i in indices or []]
    return points + [Rate.factor(f) for f in factors or []]


def evaluate(cfg: DictConfig, ckpts: list[str]) -> dict[str, dict]:
    """Evaluate each checkpoint on the test images of `cfg.data`; returns the summaries.

    Two or more rate points (a λ sweep) form a curve whose BD-rate against JPEG's is reported.
    """
    if cfg.get("threads"):
        torch.set_num_threads(int(cfg.threads))
    datamodule = hydra.utils.instantiate(cfg.data)
    datamodule.prepare_data()
    datamodule.setup("test")
    images = list(datamodule.test_dataloader())
    names = datamodule.test_names
    out_dir = Path(cfg.paths.output_dir)
    console = Console()
    jpeg = [pillow_codec_curve(x, "JPEG") for x in track(images, description="JPEG ladder")]
    summaries = {}
    for ckpt in expand_checkpoints(ckpts):
        codec = load_codec(ckpt, device=cfg.device)
        codec.set_coding_options(**cfg.get("coding_options", {}))
        for rate in rate_points(codec, cfg.get("rate")):
            suffix = "" if rate is None else f"-{rate.kind}{rate.value:g}"
            name = f"{codec.name}-{ckpt.parent.parent.name}-{ckpt.stem}{suffix}"
            results = [
                evaluate_image(codec, x.to(cfg.device), n, curve, rate)
                for x, n, curve in track(
                    list(zip(images, names, jpeg)), description=f"coding {name}"
                )
            ]
            summary = summarize(results)
            write_results(results, summary, name, out_dir)
            summaries[f"{ckpt}{suffix}"] = summary
            console.print(summary_table(f"{ckpt}{suffix}", summary))
    jpeg_curve = mean_curve(jpeg)
    ours = {key: [s[key] for s in summaries.values()] for key in ("bpp", "psnr", "ms_ssim")}
    plot = plot_rd(
        {"learned (this run)": ours, "JPEG (Pillow 4:2:0)": jpeg_curve}, out_dir / "rd.png"
    )
    console.print(f"RD plot: {plot}")
    points = sorted(set(zip(ours["bpp"], ours["psnr"])))
    if len(points) >= 2:
        result = bd_rate(
            jpeg_curve["bpp"], jpeg_curve["psnr"], [r for r, _ in points], [q for _, q in points]
        )
        console.print(
            f"BD-rate against JPEG (PSNR, PCHIP) over {len(points)} points: {result.value:+.2f} % "
            f"on {result.overlap[0]:.2f}–{result.overlap[1]:.2f} dB "
            f"({100 * result.overlap_fraction:.0f} % of the joint PSNR range)"
        )
        (out_dir / "bd_rate_vs_jpeg.json").write_text(json.dumps(asdict(result), indent=2))
    console.print(f"results written to {out_dir}")
    return summaries
