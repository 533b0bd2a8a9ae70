"""LPIPS from local files, FID/KID over patches, and evaluate.py's perceptual columns."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
import torch_fidelity.feature_extractor_inceptionv3 as fidelity
import torchvision
from PIL import Image

from src.codecs.hific import HificCodec
from src.errors import ConfigError
from src.evaluation.perceptual import INCEPTION_FILE, PerceptualMetrics, patches
from src.evaluation.run import evaluate
from src.losses.perceptual import LPIPS, SHIPPED_HEADS, TRUNKS
from tests.helpers import compose_evaluate

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def lpips_dir(tmp_path_factory) -> Path:
    """LPIPS files in the public layouts (torchvision AlexNet, LPIPS v0.1 heads), random values."""
    directory = tmp_path_factory.mktemp("lpips")
    torch.manual_seed(0)
    torch.save(
        torchvision.models.alexnet(weights=None).state_dict(), directory / TRUNKS["alex"].trunk_file
    )
    channels = (64, 192, 384, 256, 256)
    heads = {f"lin{i}.model.1.weight": torch.rand(1, c, 1, 1) / c for i, c in enumerate(channels)}
    torch.save(heads, directory / TRUNKS["alex"].heads_file)
    return directory


@pytest.fixture(scope="module")
def inception_file(tmp_path_factory) -> Path:
    """torch-fidelity's InceptionV3 state dict with random values (nothing downloaded)."""
    path = tmp_path_factory.mktemp("inception") / INCEPTION_FILE
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(fidelity, "load_state_dict_from_url", lambda *a, **k: {})
        patch.setattr(fidelity.FeatureExtractorInceptionV3, "load_state_dict", lambda *a, **k: None)
        net = fidelity.FeatureExtractorInceptionV3("inception-v3-compat", ["2048"])
    torch.save(net.state_dict(), path)
    return path


def test_lpips_loads_the_public_file_layouts(lpips_dir):
    lpips = LPIPS(lpips_dir)
    trunk = torch.load(lpips_dir / TRUNKS["alex"].trunk_file)
    heads = torch.load(lpips_dir / TRUNKS["alex"].heads_file)
    assert torch.equal(lpips.net.net.slice1[0].weight, trunk["features.0.weight"])
    assert torch.equal(lpips.net.net.slice5[0].weight, trunk["features.10.weight"])
    assert torch.equal(lpips.net.lin2.model[1].weight, heads["lin2.model.1.weight"])
    assert not any(p.requires_grad for p in lpips.parameters())
    x, y = torch.rand(2, 3, 64, 64), torch.rand(2, 3, 64, 64)
    assert torch.allclose(lpips(x, x), torch.zeros(2))
    d = lpips(x, y)
    assert d.shape == (2,) and (d > 0).all()
    assert torch.allclose(d, lpips(y, x))


def test_lpips_heads_come_with_torchmetrics_when_the_directory_has_none(tmp_path, lpips_dir):
    trunk = TRUNKS["alex"].trunk_file
    (tmp_path / trunk).write_bytes((lpips_dir / trunk).read_bytes())
    lpips = LPIPS(tmp_path)
    shipped = torch.load(SHIPPED_HEADS / "alex.pth", map_location="cpu")
    assert torch.equal(lpips.net.lin4.model[1].weight, shipped["lin4.model.1.weight"])


def test_lpips_names_the_missing_file_and_where_to_put_it(tmp_path, lpips_dir):
    (tmp_path / "alex.pth").write_bytes((lpips_dir / "alex.pth").read_bytes())
    with pytest.raises(ConfigError) as err:
        LPIPS(tmp_path, key="perceptual.lpips_weights")
    message = str(err.value)
    assert "alexnet-owt-7be5be79.pth" in message and str(tmp_path) in message
    assert "download.pytorch.org" in message and "perceptual.lpips_weights" in message
    torch.save({"features.0.weight": torch.zeros(1)}, tmp_path / "alexnet-owt-7be5be79.pth")
    with pytest.raises(ConfigError, match="are not the LPIPS alex files"):
        LPIPS(tmp_path)
    with pytest.raises(ConfigError, match="is not set"):
        LPIPS("")


def test_patches_cover_the_grid_and_the_half_shifted_grid():
    x = torch.arange(3 * 300 * 520, dtype=torch.float32).reshape(1, 3, 300, 520)
    found = patches(x, 128)
    assert found.shape == (2 * 4 + 1 * 3, 3, 128, 128)
    assert torch.equal(found[5], x[0, :, 128:256, 128:256])
    assert torch.equal(found[8], x[0, :, 64:192, 64:192])
    assert patches(x, 512).shape[0] == 0


@pytest.mark.slow  # about 20 s: Inception at 299² and two 2048² matrix square roots per call
def test_fid_and_kid_on_patches_with_a_random_inception(inception_file):
    metrics = PerceptualMetrics(
        lpips_weights="random", inception_weights=str(inception_file), patch_size=64
    )
    torch.manual_seed(0)
    images = [torch.rand(1, 3, 64, 64) for _ in range(2)]
    for x in images:
        assert set(metrics.image(x, x)) == {"lpips"}
    same = metrics.dataset()
    metrics.reset()
    for x in images:
        metrics.image(x, (x + 0.3 * torch.randn_like(x)).clamp(0, 1))
    noisy = metrics.dataset()
    assert same["fid_patches"] == noisy["fid_patches"] == 2
    assert all(math.isfinite(v) for v in (*same.values(), *noisy.values()))
    # A random Inception's features carry little signal; FID still tells the sets apart.
    assert abs(same["fid"]) < 1e-2 * noisy["fid"]
    with pytest.raises(ConfigError, match="weights-inception-2015-12-05-6726825d.pth"):
        PerceptualMetrics(inception_weights="/nonexistent/inception.pth")


def test_evaluate_reports_lpips_fid_and_kid(tmp_path, sample_root, inception_file):
    # One 256×320 photo: a 128 px patch grid (2×2) and its half-shifted grid (1×2).
    photo = next((sample_root / "train").glob("*astronaut*"))
    for split in ("train", "val"):
        (tmp_path / "data" / split).mkdir(parents=True)
        Image.open(photo).convert("RGB").crop((100, 100, 420, 356)).save(
            tmp_path / "data" / split / "crop.png"
        )
    codec = HificCodec(N=4, M=8, hyper_channels=8, n_residual_blocks=1).eval()
    codec.prepare_for_coding()
    ckpt = tmp_path / "run" / "checkpoints" / "last.ckpt"
    ckpt.parent.mkdir(parents=True)
    torch.save(
        {
            "state_dict": codec.state_dict(prefix="codec."),
            "codec_name": codec.name,
            "codec_config": codec.config(),
        },
        ckpt,
    )
    cfg = compose_evaluate(
        tmp_path,
        f"ckpt={ckpt}",
        "data=folder",
        f"data.root={tmp_path}/data",
        "data.num_workers=0",
        "perceptual.patch_size=128",
        f"paths.log_dir={tmp_path}/logs",
        "perceptual.lpips_weights=random",
        f"perceptual.inception_weights={inception_file}",
    )
    (summary,) = evaluate(cfg, [str(ckpt)]).values()
    assert summary["fid_patches"] == 6 and summary["images"] == 1
    assert all(math.isfinite(summary[k]) for k in ("lpips", "fid", "kid", "bpp", "psnr"))
    written = json.loads(next((tmp_path / "eval").glob("hific-*.json")).read_text())
    assert written["summary"]["lpips"] == pytest.approx(summary["lpips"])
    assert "lpips" in next((tmp_path / "eval").glob("hific-*.csv")).read_text().splitlines()[0]
