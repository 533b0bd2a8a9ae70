"""`lic import qvrf`: the QVRF authors' models as our codec, checked against what their own code
coded (tests/fixtures/qvrf/README.md says how that was produced)."""

from __future__ import annotations

import json

import pytest
import torch

from src.cli import main as lic
from src.codecs.compressai_zoo import CompressAICodec, compressai_state
from src.codecs.importing import fit_problems, import_weights, rename_state
from src.codecs.loading import load_codec
from src.codecs.qvrf import _RELEASE_RULES, QvrfCodec
from src.coding.container import Rate
from src.datamodules.images import decode_rgb
from src.errors import CheckpointError
from tests.helpers import fixture_path

pytestmark = pytest.mark.usefixtures("one_thread")
# fixture prefix -> (our backbone, parameters at paper size: backbone + 8 gains)
RELEASES = {
    "cheng2020": ("cheng2020-attn", 29_631_796),
    "hyperprior": ("bmshj2018-hyperprior", 11_816_331),
}


def reference(prefix: str) -> dict:
    return torch.load(fixture_path("qvrf", f"{prefix}_outputs.pt"), weights_only=True)


def fixture_input() -> torch.Tensor:
    return decode_rgb(fixture_path("qvrf", "input.png")).float().div(255).unsqueeze(0)


def as_rate(entry: dict) -> Rate:
    return (
        Rate.index(int(entry["value"])) if entry["kind"] == "index" else Rate.factor(entry["value"])
    )


@pytest.mark.parametrize("prefix", sorted(RELEASES))
def test_release_imports_to_the_authors_streams_byte_for_byte(prefix, tmp_path, capsys):
    source = fixture_path("qvrf", f"{prefix}_state_dict.pth.tar")
    out = tmp_path / "qvrf.ckpt"
    assert lic(["import", "qvrf", str(source), str(out)]) == 0
    assert "parameters" in capsys.readouterr().out
    codec = load_codec(out)
    codec.set_coding_options(coding_order="raster")  # the authors' order (ours: wavefront)
    assert codec.arch == RELEASES[prefix][0] and codec.anchor == 0
    released = torch.load(source, weights_only=True)["Gain"]
    assert torch.equal(codec.gain.detach(), released)  # the learnt gains, not recomputed ones
    x, expected = fixture_input(), reference(prefix)
    assert len(expected["rates"]) == 5
    for entry in expected["rates"]:
        encoded = codec.compress(x, as_rate(entry))
        assert list(encoded.latent_shape) == expected["z_shape"]
        assert encoded.streams[0] == bytes(entry["y"].tolist()), (entry["kind"], entry["value"])
        assert encoded.streams[1] == bytes(entry["z"].tolist()), (entry["kind"], entry["value"])
        if "x_hat" in entry:  # and our decoder rebuilds their reconstruction
            x_hat = codec.decompress_bytes(codec.compress_to_bytes(x, as_rate(entry)))
            assert torch.allclose(x_hat, entry["x_hat"], atol=1e-5)


def test_a_checkpoint_of_their_train_script_imports_too(tmp_path):
    state = torch.load(fixture_path("qvrf", "hyperprior_state_dict.pth.tar"), weights_only=True)
    torch.save(
        {"epoch": 499, "state_dict": state, "loss": torch.tensor(1.0)}, tmp_path / "c.pth.tar"
    )
    codec, _ = import_weights("qvrf", tmp_path / "c.pth.tar", tmp_path / "o.ckpt")
    entry = reference("hyperprior")["rates"][2]
    assert codec.compress(fixture_input(), as_rate(entry)).streams[0] == bytes(entry["y"].tolist())


@pytest.mark.parametrize("prefix", sorted(RELEASES))
def test_paper_size_release_keys_fit_the_paper_size_codec(prefix):
    arch, parameters = RELEASES[prefix]
    shapes = json.loads(fixture_path("qvrf", f"{prefix}_paper_keys.json").read_text())
    codec = QvrfCodec(arch, quality=6)
    assert fit_problems(codec, rename_state(compressai_state(shapes), _RELEASE_RULES)) == []
    assert sum(p.numel() for p in codec.parameters()) == parameters


def test_what_is_not_a_qvrf_release_is_refused(tmp_path, monkeypatch):
    fixed = CompressAICodec("bmshj2018-hyperprior", 1, N=8, M=8)
    torch.save(fixed.net.state_dict(), tmp_path / "fixed.pth.tar")
    with pytest.raises(CheckpointError, match="no Gain vector.*lic import compressai"):
        import_weights("qvrf", tmp_path / "fixed.pth.tar", tmp_path / "o.ckpt")
    state = torch.load(fixture_path("qvrf", "cheng2020_state_dict.pth.tar"), weights_only=True)
    torch.save({**state, "Gain": torch.ones(5)}, tmp_path / "five.pth.tar")
    with pytest.raises(CheckpointError, match="8 or 11 gains"):
        import_weights("qvrf", tmp_path / "five.pth.tar", tmp_path / "o.ckpt")
    torch.save(state, tmp_path / "cheng.pth.tar")
    with pytest.raises(CheckpointError, match="not a mbt2018-mean QVRF model"):
        import_weights("qvrf", tmp_path / "cheng.pth.tar", tmp_path / "o.ckpt", arch="mbt2018_mean")
    monkeypatch.chdir(tmp_path)
    with pytest.raises(CheckpointError, match="nothing is downloaded.*bytedance/QRAF"):
        import_weights("qvrf", "Cheng2020VR.pth.tar", tmp_path / "o.ckpt")
