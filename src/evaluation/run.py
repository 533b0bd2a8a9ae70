"""What `python evaluate.py` does with a composed config.

Checkpoints are coded image by image (per-image CSV, one JSON per rate point); they are grouped
into curves (the fixed-rate checkpoints of one codec form one curve, a variable-rate checkpoint is
a curve of its own), written in CompressAI's results format, drawn beside the classical baselines
and any published curves, and compared to an anchor curve by BD-rate over PSNR and MS-SSIM (dB).
"""

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
from src.errors import CheckpointError, ConfigError
from src.evaluation.baselines import baseline_curves, classical_codec, image_curve
from src.evaluation.bd_rate import bd_rate
from src.evaluation.evaluate import evaluate_image, summarize, write_results
from src.evaluation.metrics import ms_ssim_db
from src.evaluation.perceptual import PerceptualMetrics
from src.evaluation.plot import plot_rd
from src.evaluation.progressive import evaluate_progressive, progressive_table

SHOWN = (
    "bpp",
    "psnr",
    "ms_ssim",
    "delta_psnr_vs_jpeg_db",
    "rate_vs_jpeg_percent",
    "worst_delta_psnr_vs_jpeg_db",
    "worst_colour_shift",
    "estimated_bpp",
    "real_over_estimated",
    "encoding_time",
    "decoding_time",
    "all_match_forward",
)

Curve = dict[str, list[float]]


def summary_table(title: str, summary: dict) -> Table:
    """The headline figures of one rate point, one per row (the codec's own figures too)."""
    table = Table(title=f"{title}  ({summary['images']} images)", show_header=False)
    keys = list(SHOWN) + [k for k in summary if k not in SHOWN and k != "images"]
    for key in keys:
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


def results_curve(payload: dict) -> Curve:
    """bpp / psnr / ms_ssim lists out of a CompressAI-format results JSON."""
    results = payload["results"]
    curve = {"bpp": results["bpp"], "psnr": results.get("psnr-rgb", results.get("psnr"))}
    nan = [float("nan")] * len(curve["bpp"])
    curve["ms_ssim"] = results.get("ms-ssim-rgb", results.get("ms-ssim", nan))
    if curve["psnr"] is None:
        raise ConfigError(f"results file of {payload.get('name')!r} has no psnr-rgb")
    return curve


def load_results_json(path: str | Path) -> tuple[str, Curve]:
    """A published curve (e.g. CompressAI's results/image/kodak/*.json) as (name, curve)."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"curve file {path} does not exist")
    try:
        payload = json.loads(path.read_text())
        return payload.get("name", path.stem), results_curve(payload)
    except (json.JSONDecodeError, KeyError, TypeError) as err:
        raise ConfigError(f"{path} is not a results JSON (name, results: bpp, psnr-rgb)") from err


def write_curve(name: str, description: str, summaries: list[dict], out_dir: Path) -> Path:
    """One learned curve in CompressAI's results format."""
    results = {
        key: [s[field] for s in summaries]
        for key, field in (
            ("bpp", "bpp"),
            ("psnr-rgb", "psnr"),
            ("ms-ssim-rgb", "ms_ssim"),
            ("encoding_time", "encoding_time"),
            ("decoding_time", "decoding_time"),
            ("estimated_bpp", "estimated_bpp"),
        )
    }
    path = out_dir / f"curve-{name.replace('/', '_').replace(':', '_')}.json"
    payload = {"name": name, "description": description, "results": results}
    path.write_text(json.dumps(payload, indent=2))
    return path


def bd_table(
    curves: dict[str, Curve], anchor: str, method: str
) -> tuple[Table, list[dict[str, object]]]:
    """BD-rate of every curve against `anchor`, over PSNR and over MS-SSIM in dB."""
    table = Table(title=f"BD-rate against {anchor} ({method}; negative = fewer bits)")
    for column in ("curve", "points", "PSNR", "PSNR overlap (dB)", "MS-SSIM dB", "overlap (dB)"):
        table.add_column(column)
    rows = []
    base = curves[anchor]
    for name, curve in curves.items():
        if name == anchor or len(set(curve["bpp"])) < 2:
            continue
        row: dict[str, object] = {"curve": name, "anchor": anchor, "method": method}
        cells = [name, str(len(curve["bpp"]))]
        for metric in ("psnr", "ms_ssim"):
            to_db = (lambda v: v) if metric == "psnr" else (lambda v: float(ms_ssim_db(v)))
            try:
                result = bd_rate(
                    base["bpp"],
                    [to_db(v) for v in base[metric]],
                    curve["bpp"],
                    [to_db(v) for v in curve[metric]],
                    method,
                )
            except ValueError:  # fewer than two finite points (MS-SSIM on tiny images)
                cells += ["n/a", ""]
                continue
            row[metric] = asdict(result)
            cells += [
                f"{result.value:+.2f} %",
                f"{result.overlap[0]:.2f}–{result.overlap[1]:.2f} "
                f"({100 * result.overlap_fraction:.0f} %)",
            ]
        table.add_row(*cells)
        rows.append(row)
    return table, rows


def curve_label(codec: Codec, ckpt: Path) -> str:
    """Fixed-rate checkpoints of one codec share a curve; a variable-rate one is its own."""
    return codec.name if codec.num_rates == 1 else f"{codec.name}:{ckpt.parent.parent.name}"


def evaluate(cfg: DictConfig, ckpts: list[str]) -> dict[str, dict]:
    """Evaluate each checkpoint on the test images of `cfg.data`; returns the summaries."""
    if cfg.get("threads"):
        torch.set_num_threads(int(cfg.threads))
    # Built first: missing weight files stop the run before any coding.
    perceptual = PerceptualMetrics.from_config(cfg.get("perceptual"), device=cfg.device)
    datamodule = hydra.utils.instantiate(cfg.data)
    datamodule.prepare_data()
    datamodule.setup("test")
    images = list(datamodule.test_dataloader())
    names = datamodule.test_names
    out_dir = Path(cfg.paths.output_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    console = Console()

    baselines: dict[str, dict] = {}
    for name in cfg.get("baselines") or ["jpeg"]:
        codec = classical_codec(name, cfg.get("baseline_qualities"))
        if codec is None:
            console.print(f"note: baseline {name} skipped: not available on this machine")
            continue
        baselines[name] = baseline_curves(codec, images, names, cfg.get("baseline_cache"))
        (out_dir / f"{name}.json").write_text(json.dumps(baselines[name], indent=1))
    jpeg = baselines.get("jpeg")

    summaries: dict[str, dict] = {}
    learned: dict[str, list[dict]] = {}
    for ckpt in expand_checkpoints(ckpts):
        codec = load_codec(ckpt, device=cfg.device)
        codec.set_coding_options(**cfg.get("coding_options", {}))
        for rate in rate_points(codec, cfg.get("rate")):
            suffix = "" if rate is None else f"-{rate.kind}{rate.value:g}"
            name = f"{codec.name}-{ckpt.parent.parent.name}-{ckpt.stem}{suffix}"
            if perceptual is not None:
                perceptual.reset()
            results = [
                evaluate_image(
                    codec,
                    x.to(cfg.device),
                    n,
                    image_curve(jpeg, n) if jpeg else None,
                    rate,
                    tile=cfg.get("tile"),
                    perceptual=perceptual and perceptual.image,
                )
                for x, n in track(list(zip(images, names)), description=f"coding {name}")
            ]
            summary = summarize(results)
            if perceptual is not None:
                summary.update(perceptual.dataset())
            write_results(results, summary, name, out_dir)
            summaries[f"{ckpt}{suffix}"] = summary
            learned.setdefault(curve_label(codec, ckpt), []).append(summary)
            console.print(summary_table(f"{ckpt}{suffix}", summary))
            if cfg.get("progressive"):
                refs = {"jpeg": results_curve(jpeg)} if jpeg else {}
                devices = [x.to(cfg.device) for x in images]
                curve = evaluate_progressive(codec, devices, names, name, out_dir, refs)
                console.print(progressive_table(f"{ckpt}{suffix}", curve))

    curves: dict[str, Curve] = {}
    for label, points in learned.items():
        write_curve(label, "lic-lab, real entropy coding; means over images", points, out_dir)
        curves[label] = {key: [p[key] for p in points] for key in ("bpp", "psnr", "ms_ssim")}
    for name, payload in baselines.items():
        curves[name] = results_curve(payload)
    for path in cfg.get("curves") or []:
        name, curve = load_results_json(path)
        curves[name] = curve

    plot = plot_rd(curves, out_dir / "rd.png")
    console.print(f"RD plot: {plot}")
    anchor = str(cfg.get("anchor") or "jpeg")
    if anchor not in curves:
        if Path(anchor).is_file():
            anchor_name, curves_anchor = load_results_json(anchor)
            curves[anchor_name] = curves_anchor
            anchor = anchor_name
        else:
            raise ConfigError(
                f"anchor={anchor} is neither a curve of this run ({', '.join(curves)}) "
                "nor a results JSON file"
            )
    table, rows = bd_table(curves, anchor, str(cfg.get("bd_method") or "pchip"))
    if rows:
        console.print(table)
        (out_dir / "bd_rate.json").write_text(json.dumps(rows, indent=2))
    console.print(f"results written to {out_dir}")
    return summaries
