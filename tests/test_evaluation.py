"""Evaluation pieces: classical baselines and their cache, BD tables, published curves."""

from __future__ import annotations

import json

import pytest
import torch

from src.errors import ConfigError
from src.evaluation import baselines
from src.evaluation.baselines import baseline_curves, classical_codec, dataset_key, image_curve
from src.evaluation.run import bd_table, load_results_json


@pytest.fixture(scope="module")
def photos(sample_root) -> tuple[list[torch.Tensor], list[str]]:
    from src.datamodules.images import decode_rgb

    paths = sorted((sample_root / "val").iterdir())[:2]
    return [decode_rgb(p)[:, :200, :240].float().div(255).unsqueeze(0) for p in paths], [
        p.name for p in paths
    ]


def test_baseline_curves_are_cached_per_dataset(photos, tmp_path, monkeypatch):
    images, names = photos
    webp = classical_codec("webp", [5, 50, 95])
    first = baseline_curves(webp, images, names, tmp_path)
    assert first["results"]["quality"] == [5, 50, 95]
    bpp = first["results"]["bpp"]
    assert bpp == sorted(bpp)  # more bits for a higher quality
    assert [p.quality for p in image_curve(first, names[0])] == [5, 50, 95]

    def no_coding(*_):
        raise AssertionError("coded again despite the cache")

    monkeypatch.setattr(baselines.ClassicalCodec, "code", no_coding)
    assert baseline_curves(webp, images, names, tmp_path) == first
    # Another dataset, or another ladder, is not served from this cache.
    with pytest.raises(AssertionError, match="coded again"):
        baseline_curves(classical_codec("webp", [5, 50]), images, names, tmp_path)
    assert dataset_key(images, names) != dataset_key(images[:1], names[:1])


def test_avif_and_unknown_baselines(photos):
    avif = classical_codec("avif", [20, 80])
    if avif is None:
        pytest.skip("no AVIF encoder on this machine")
    points = avif.curve(photos[0][0])
    assert points[0].bpp < points[1].bpp and points[0].psnr < points[1].psnr
    with pytest.raises(ConfigError, match="unknown baseline 'bpg'"):
        classical_codec("bpg")


def test_bd_table_over_psnr_and_ms_ssim():
    anchor = {"bpp": [0.2, 0.4, 0.8, 1.6], "psnr": [28, 31, 34, 37]}
    anchor["ms_ssim"] = [0.90, 0.94, 0.97, 0.985]
    # The same qualities at 80 % of the bits: BD-rate -20 % over both metrics.
    test = {**anchor, "bpp": [0.8 * b for b in anchor["bpp"]]}
    _, rows = bd_table({"anchor": anchor, "test": test}, "anchor", "pchip")
    assert rows[0]["psnr"]["value"] == pytest.approx(-20, abs=1e-6)
    assert rows[0]["ms_ssim"]["value"] == pytest.approx(-20, abs=1e-6)


def test_published_curve_files(tmp_path):
    path = tmp_path / "published.json"
    payload = {"name": "mbt2018", "results": {"bpp": [0.1, 0.2], "psnr-rgb": [27.0, 29.0]}}
    path.write_text(json.dumps(payload))
    name, curve = load_results_json(path)
    assert name == "mbt2018" and curve["psnr"] == [27.0, 29.0] and len(curve["ms_ssim"]) == 2
    (tmp_path / "bad.json").write_text("{}")
    with pytest.raises(ConfigError, match="not a results JSON"):
        load_results_json(tmp_path / "bad.json")


def test_tiled_evaluation_matches_the_forward_pass_tile_by_tile():
    from src.codecs.compressai_zoo import CompressAICodec
    from src.evaluation.evaluate import evaluate_image

    torch.manual_seed(0)
    codec = CompressAICodec("bmshj2018-hyperprior", quality=1, N=8, M=8).eval()
    codec.prepare_for_coding()
    x = torch.rand(1, 3, 150, 200)
    whole = evaluate_image(codec, x, "x", None)
    tiled = evaluate_image(codec, x, "x", None, tile=64)
    assert whole.matches_forward and tiled.matches_forward
    assert tiled.bpp > whole.bpp  # 12 tiles, each coded on its own, cost more than one image


def test_summary_names_the_worst_image_and_the_colour_drift():
    from src.evaluation.evaluate import ImageResult, summarize
    from src.evaluation.metrics import mean_colour_shift

    x = torch.full((2, 3, 8, 8), 0.5)
    y = x.clone()
    y[0, 1] += 6 / 255  # the first image's green drifted by 6 levels, the second kept its colour
    assert mean_colour_shift(x, y).tolist() == pytest.approx([6.0, 0.0], abs=1e-4)

    def result(psnr: float, jpeg: float, shift: float) -> ImageResult:
        nan = float("nan")
        return ImageResult("x", 0.2, 0.2, psnr, nan, 0.0, 0.0, True, jpeg, nan, shift)

    summary = summarize(
        [result(30.0, 28.0, 1.0), result(25.0, 29.0, 7.5), result(31.0, float("nan"), 0.5)]
    )
    assert summary["delta_psnr_vs_jpeg_db"] == pytest.approx(-1.0)  # (2 - 4) / 2
    assert summary["worst_delta_psnr_vs_jpeg_db"] == pytest.approx(-4.0)
    assert summary["worst_colour_shift"] == pytest.approx(7.5)
