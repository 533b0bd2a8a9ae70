"""Evaluation pieces: classical baselines and their cache, BD tables, published curves."""

from __future__ import annotations

import json

import pytest
import torch

from src.errors import ConfigError
from src.evaluation import baselines
from src.evaluation.baselines import baseline_curves, classical_codec, dataset_key, image_curve
from src.evaluation.run import anchors, bd_table, published_label, read_results_json


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


def test_hevc_and_jpeg_xl_come_from_pip_plugins(photos):
    """pillow-heif's x265 at 4:4:4 and 4:2:0, and pillow-jxl-plugin: each codes real files whose
    size grows with the quality, and says which library made the numbers."""
    x = photos[0][0]
    hevc, hevc420, jxl = (classical_codec(n, [10, 60]) for n in ("hevc", "hevc420", "jxl"))
    assert "pillow_heif" in hevc.description() and "chroma=444" in hevc.description()
    assert "chroma=420" in hevc420.description() and "pillow_jxl" in jxl.description()
    curves = {c.name: c.curve(x) for c in (hevc, hevc420, jxl)}
    for points in curves.values():
        assert points[0].bpp < points[1].bpp and points[0].psnr < points[1].psnr
    assert curves["hevc"][1].bpp != curves["hevc420"][1].bpp  # another chroma format was coded


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
    name, curve, dataset = read_results_json(path)
    assert name == "mbt2018" and curve["psnr"] == [27.0, 29.0] and len(curve["ms_ssim"]) == 2
    assert dataset == tmp_path.name  # the folder it lies in, as CompressAI's results/image/kodak
    (tmp_path / "bad.json").write_text("{}")
    with pytest.raises(ConfigError, match="not a results JSON"):
        read_results_json(tmp_path / "bad.json")
    path.write_text(json.dumps({**payload, "dataset": "kodak"}))
    assert read_results_json(path)[2] == "kodak"


def test_a_published_curve_never_replaces_a_measured_one(tmp_path):
    """Our bmshj2018-hyperprior and CompressAI's published one both stay, under distinct names,
    and either can be the anchor (the published one by its file)."""
    published = tmp_path / "kodak" / "compressai-bmshj2018-hyperprior.json"
    published.parent.mkdir()
    payload = {"name": "bmshj2018-hyperprior", "results": {"bpp": [0.2, 0.4], "psnr-rgb": [29, 32]}}
    published.write_text(json.dumps(payload))
    ours = {"bpp": [0.25, 0.5], "psnr": [29.0, 32.0], "ms_ssim": [0.9, 0.95]}
    curves = {"bmshj2018-hyperprior": ours, "jpeg": ours}
    assert anchors(str(published), curves) == ["bmshj2018-hyperprior [published, kodak]"]
    assert curves["bmshj2018-hyperprior"] is ours and len(curves) == 3
    assert published_label("x", "kodak") != "x"
    assert anchors(["jpeg", "hevc"], curves) == ["jpeg"]  # a default anchor this run lacks
    with pytest.raises(ConfigError, match="anchor=mbt2018 is neither"):
        anchors("mbt2018", curves)


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


def test_bpp_and_psnr_are_counted_as_asked_and_both_counts_are_named():
    from src.codecs.compressai_zoo import CompressAICodec
    from src.evaluation.evaluate import Counting, evaluate_image, stream_bytes
    from src.evaluation.metrics import psnr

    torch.manual_seed(0)
    codec = CompressAICodec("bmshj2018-hyperprior", quality=1, N=8, M=8).eval()
    codec.prepare_for_coding()
    x = torch.rand(1, 3, 64, 96)
    pixels = 64 * 96
    data = codec.compress_to_bytes(x)
    payload = sum(len(s) for s in codec.compress(x).streams)
    assert stream_bytes(data) == payload < len(data) - 20  # the header, lengths and CRC
    default = evaluate_image(codec, x, "x", None)
    paper = evaluate_image(codec, x, "x", None, counting=Counting("streams", "float"))
    for result in (default, paper):
        assert result.bpp_file == 8 * len(data) / pixels
        assert result.bpp_streams == 8 * payload / pixels
        assert result.psnr_float == pytest.approx(float(psnr(x, codec.decompress_bytes(data))))
        assert result.psnr_8bit != result.psnr_float
    assert (default.bpp, default.psnr) == (default.bpp_file, default.psnr_8bit)
    assert (paper.bpp, paper.psnr) == (paper.bpp_streams, paper.psnr_float)
    tiled = codec.compress_to_bytes(x, tile=64)
    tiles = [codec.compress(x[..., :, :64]), codec.compress(x[..., :, 64:])]
    assert stream_bytes(tiled) == sum(len(s) for t in tiles for s in t.streams)
    with pytest.raises(ConfigError, match="bpp=bytes"):
        Counting("bytes")
    with pytest.raises(ConfigError, match="psnr=16bit"):
        Counting(psnr="16bit")


def test_evaluate_names_its_counting_in_the_csv_json_and_curve(tmp_path, sample_root):
    import csv

    from PIL import Image

    from src.codecs.compressai_zoo import CompressAICodec
    from src.codecs.importing import codec_checkpoint
    from src.datamodules.images import decode_rgb
    from src.evaluation.run import evaluate
    from tests.helpers import compose_evaluate

    torch.manual_seed(0)
    ckpt = tmp_path / "tiny.ckpt"
    torch.save(codec_checkpoint(CompressAICodec("bmshj2018-factorized", 1, N=8, M=8)), ckpt)
    img = decode_rgb(next((sample_root / "val").glob("*chelsea*")))[:, :64, :96]
    for split in ("train", "val"):
        (tmp_path / "photos" / split).mkdir(parents=True)
        Image.fromarray(img.permute(1, 2, 0).numpy()).save(tmp_path / "photos" / split / "cat.png")
    cfg = compose_evaluate(
        tmp_path,
        f"ckpt={ckpt}",
        "data=folder",
        f"data.root={tmp_path}/photos",
        f"baseline_cache={tmp_path}/cache",
        "baseline_qualities=[10,50,90]",
        "bpp=streams",
        "psnr=float",
    )
    (summary,) = evaluate(cfg, [str(ckpt)]).values()
    assert (summary["bpp_counts"], summary["psnr_on"]) == ("streams", "float")
    assert summary["bpp"] == summary["bpp_streams"] < summary["bpp_file"]
    assert summary["psnr"] == summary["psnr_float"]
    (result,) = (tmp_path / "eval").glob("bmshj2018-factorized-*.json")
    payload = json.loads(result.read_text())
    assert payload["counting"] == {"bpp": "streams", "psnr": "float"}
    assert payload["results"]["bpp"] == [summary["bpp_streams"]]
    with open(result.with_suffix(".csv")) as f:
        assert {"bpp_file", "bpp_streams", "psnr_8bit", "psnr_float"} <= set(next(csv.reader(f)))
    curve = json.loads((tmp_path / "eval" / "curve-bmshj2018-factorized.json").read_text())
    assert "entropy-coded streams" in curve["description"] and "float" in curve["description"]


def test_summary_names_the_worst_image_and_the_colour_drift():
    from src.evaluation.evaluate import ImageResult, summarize
    from src.evaluation.metrics import mean_colour_shift

    x = torch.full((2, 3, 8, 8), 0.5)
    y = x.clone()
    y[0, 1] += 6 / 255  # the first image's green drifted by 6 levels, the second kept its colour
    assert mean_colour_shift(x, y).tolist() == pytest.approx([6.0, 0.0], abs=1e-4)

    def result(psnr: float, jpeg: float, shift: float) -> ImageResult:
        nan = float("nan")
        return ImageResult(
            "x", 0.2, 0.2, psnr, nan, 0.2, 0.2, psnr, psnr, 0.0, 0.0, True, jpeg, nan, shift
        )

    summary = summarize(
        [result(30.0, 28.0, 1.0), result(25.0, 29.0, 7.5), result(31.0, float("nan"), 0.5)]
    )
    assert summary["delta_psnr_vs_jpeg_db"] == pytest.approx(-1.0)  # (2 - 4) / 2
    assert summary["worst_delta_psnr_vs_jpeg_db"] == pytest.approx(-4.0)
    assert summary["worst_colour_shift"] == pytest.approx(7.5)
