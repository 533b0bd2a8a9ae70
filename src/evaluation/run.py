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
from omegaconf import DictConfig, ListConfig
from rich.console import Console
from rich.table import Table
from torch import Tensor

from src.codecs.base import Codec
from src.codecs.loading import load_codec
from src.coding.container import MAX_PIXELS, Rate
from src.errors import CheckpointError, ConfigError
from src.evaluation.baselines import (
    CLASSICAL_CODECS,
    baseline_curves,
    classical_codec,
    image_curve,
)
from src.evaluation.bd_rate import bd_rate
from src.evaluation.evaluate import Counting, evaluate_image, summarize, write_results
from src.evaluation.metrics import ms_ssim_db
from src.evaluation.perceptual import PerceptualMetrics
from src.evaluation.plot import plot_rd
from src.evaluation.progressive import evaluate_progressive, progressive_table
from src.evaluation.report import Panel, centre_crop, classical_panel, learned_panels, write_report
from src.utils.progress import track

SHOWN = (
    "bpp",
    "psnr",
    "ms_ssim",
    "bpp_counts",
    "psnr_on",
    "bpp_file",
    "bpp_streams",
    "psnr_8bit",
    "psnr_float",
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


def read_results_json(path: str | Path) -> tuple[str, Curve, str]:
    """(name, curve, dataset) of a results JSON (e.g. CompressAI's results/image/kodak/*.json);
    the dataset is its "dataset" entry, else the
    folder it lies in (CompressAI keeps results/image/<dataset>/<model>.json)."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"curve file {path} does not exist")
    try:
        payload = json.loads(path.read_text())
        dataset = str(payload.get("dataset") or path.resolve().parent.name)
        return payload.get("name", path.stem), results_curve(payload), dataset
    except (json.JSONDecodeError, KeyError, TypeError, AttributeError) as err:
        raise ConfigError(f"{path} is not a results JSON (name, results: bpp, psnr-rgb)") from err


def published_label(name: str, dataset: str) -> str:
    """How a curve read from a results file is named in the plot and the BD table: never the
    same as a curve this run measured."""
    return f"{name} [published, {dataset}]"


def evaluated_dataset(data_cfg: DictConfig) -> str:
    """A name for the images evaluated: the folder (or LMDB) they come from."""
    return Path(str(data_cfg.get("root") or data_cfg.get("path") or "")).name or "unknown"


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


def anchors(spec: object, curves: dict[str, Curve]) -> list[str]:
    """The BD-rate anchors of `anchor=` (one or a list: baseline or curve names, results JSON
    files, added to `curves` as published). Baselines missing on this machine are skipped with
    a note when they are only the default's; a named curve that does not exist is an error."""
    names = [str(a) for a in (spec if isinstance(spec, (list, ListConfig)) else [spec or "jpeg"])]
    found = []
    for anchor in names:
        if anchor in curves:
            found.append(anchor)
        elif Path(anchor).is_file():
            name, curve, source = read_results_json(anchor)
            label = published_label(name, source)
            curves[label] = curve
            found.append(label)
        elif anchor in CLASSICAL_CODECS and len(names) > 1:
            continue  # a default anchor whose codec this machine lacks (noted above)
        else:
            raise ConfigError(
                f"anchor={anchor} is neither a curve of this run ({', '.join(curves)}) "
                "nor a results JSON file"
            )
    return found


def curve_label(codec: Codec, ckpt: Path) -> str:
    """Fixed-rate checkpoints of one codec share a curve; a variable-rate one is its own."""
    return codec.name if codec.num_rates == 1 else f"{codec.name}:{ckpt.parent.parent.name}"


def evaluate(cfg: DictConfig, ckpts: list[str]) -> dict[str, dict]:
    """Evaluate each checkpoint on the test images of `cfg.data`; returns the summaries."""
    if cfg.get("threads"):
        torch.set_num_threads(int(cfg.threads))
    counting = Counting(str(cfg.get("bpp") or "file"), str(cfg.get("psnr") or "8bit"))
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
    shown = names[: int((cfg.get("report") or {}).get("images", 2))]
    crops: dict[str, dict[str, list[Panel]]] = {n: {} for n in shown}  # image -> curve -> points
    for ckpt in expand_checkpoints(ckpts):
        codec = load_codec(ckpt, device=cfg.device)
        codec.set_coding_options(**cfg.get("coding_options", {}))
        for rate in rate_points(codec, cfg.get("rate")):
            suffix = "" if rate is None else f"-{rate.kind}{rate.value:g}"
            name = f"{codec.name}-{ckpt.parent.parent.name}-{ckpt.stem}{suffix}"
            if perceptual is not None:
                perceptual.reset()
            label = curve_label(codec, ckpt)
            results = []
            for x, n in track(list(zip(images, names)), description=f"coding {name}"):
                decoded: list[Tensor] = []
                result = evaluate_image(
                    codec,
                    x.to(cfg.device),
                    n,
                    image_curve(jpeg, n) if jpeg else None,
                    rate,
                    tile=cfg.get("tile"),
                    perceptual=perceptual and perceptual.image,
                    counting=counting,
                    on_decoded=decoded.append if n in crops else None,
                    max_pixels=cfg.get("max_pixels") or MAX_PIXELS,
                )
                results.append(result)
                if n in crops:
                    panel = Panel(
                        f"{label}{suffix}", centre_crop(decoded[0].cpu()), result.bpp, result.psnr
                    )
                    crops[n].setdefault(label, []).append(panel)
            summary = summarize(results, counting)
            if perceptual is not None:
                summary.update(perceptual.dataset())
            write_results(results, summary, name, out_dir, counting)
            summaries[f"{ckpt}{suffix}"] = summary
            learned.setdefault(label, []).append(summary)
            console.print(summary_table(f"{ckpt}{suffix}", summary))
            if cfg.get("progressive"):
                refs = {"jpeg": results_curve(jpeg)} if jpeg else {}
                devices = [x.to(cfg.device) for x in images]
                curve = evaluate_progressive(codec, devices, names, name, out_dir, refs)
                console.print(progressive_table(f"{ckpt}{suffix}", curve))

    curves: dict[str, Curve] = {}
    for label, points in learned.items():
        description = f"lic-lab, real entropy coding; {counting.describe()}; means over images"
        write_curve(label, description, points, out_dir)
        curves[label] = {key: [p[key] for p in points] for key in ("bpp", "psnr", "ms_ssim")}
    for name, payload in baselines.items():
        curves[name] = results_curve(payload)
    dataset = evaluated_dataset(cfg.data)
    for path in cfg.get("curves") or []:
        name, curve, source = read_results_json(path)
        if source.lower() != dataset.lower():
            console.print(
                f"warning: curve {name} from {path} was measured on {source}, "
                f"this evaluation codes {dataset}: their BD-rates compare different images"
            )
        label = published_label(name, source)
        if label in curves:
            raise ConfigError(f"curves= names {label!r} twice ({path})")
        curves[label] = curve

    plot = plot_rd(curves, out_dir / "rd.png")
    console.print(f"RD plot: {plot}")
    all_rows = []
    for anchor in anchors(cfg.get("anchor"), curves):
        table, rows = bd_table(curves, anchor, str(cfg.get("bd_method") or "pchip"))
        if rows:
            console.print(table)
            all_rows += rows
    if all_rows:
        (out_dir / "bd_rate.json").write_text(json.dumps(all_rows, indent=2))
    comparisons = []
    for n, by_curve in crops.items():
        x = images[names.index(n)]
        panels = [Panel("original", centre_crop(x))] + learned_panels(by_curve)
        if len(panels) > 1:
            for base, payload in baselines.items():
                codec = classical_codec(base, payload["results"]["quality"])
                panels.append(classical_panel(codec, x, image_curve(payload, n), panels[1].bpp))
        comparisons.append((n, panels))
    report = write_report(
        out_dir / "report.html", f"lic-lab evaluation on {dataset}", plot, all_rows, comparisons
    )
    console.print(f"report: {report}")
    console.print(f"results written to {out_dir}")
    return summaries
