"""`lic import lvae`: QRes-VAE's released weights, checked against data the authors' code wrote
(tests/fixtures/qres_vae/README.md): byte-identical streams, the same reconstruction, every
paper-size key mapped, and a warm start of training from the imported checkpoint."""

from __future__ import annotations

import json

import hydra
import pytest
import torch

from src.cli import main as lic
from src.codecs.importing import fit_problems, import_weights
from src.codecs.loading import load_codec
from src.codecs.qres_vae import QResVAE, lvae_state
from src.datamodules.images import decode_rgb
from src.errors import CheckpointError
from tests.helpers import fixture_path

pytestmark = pytest.mark.usefixtures("one_thread")
FAMILY = "qres_vae"


def fixture_input() -> torch.Tensor:
    """The 64 x 128 crop the reference coded, (1, 3, 64, 128) in [0, 1]."""
    return decode_rgb(fixture_path(FAMILY, "input.png")).float().div(255).unsqueeze(0)


def imported(name: str, tmp_path) -> QResVAE:
    """The fixture's state dict through `lic import lvae`, loaded back from the checkpoint."""
    out = tmp_path / f"{name}.ckpt"
    source = fixture_path(FAMILY, f"{name}_state_dict.pt")
    assert lic(["import", "lvae", str(source), str(out), "--arch", name]) == 0
    return load_codec(out)


def test_imported_qres34m_writes_the_references_streams_and_reconstruction(tmp_path):
    codec = imported("qres34m", tmp_path)
    assert codec.name == "qres34m" and codec.config()["N"] == 4
    reference = torch.load(fixture_path(FAMILY, "qres34m_outputs.pt"), weights_only=True)
    x = fixture_input()
    encoded = codec.compress(x)
    assert encoded.streams == reference["streams"]  # twelve latent streams, byte for byte
    assert list(encoded.latent_shape) == reference["latent_shape"][-2:]
    decoded = codec.decompress_bytes(codec.compress_to_bytes(x))
    torch.testing.assert_close(decoded, reference["reconstruction"], rtol=0, atol=1e-6)


def test_imported_lossless_model_writes_the_references_streams_and_decodes_exactly(tmp_path):
    codec = imported("qres34m_lossless", tmp_path)
    assert codec.name == "qres34m_lossless"
    reference = torch.load(fixture_path(FAMILY, "qres34m_lossless_outputs.pt"), weights_only=True)
    x = fixture_input()
    encoded = codec.compress(x)
    assert len(encoded.streams) == 13
    assert encoded.streams == reference["streams"]  # the pixel stream too
    assert torch.equal(codec.decompress(encoded) * 255, (x * 255).round())


@pytest.mark.parametrize(
    "name, arch, lossless",
    [
        ("qres34m", "qres34m", False),
        ("qres17m", "qres17m", False),
        ("qres34m_lossless", "qres34m", True),
    ],
)
def test_every_released_key_maps_onto_ours_at_paper_size(name, arch, lossless):
    keys = json.loads(fixture_path(FAMILY, f"paper_keys_{name}.json").read_text())
    with torch.device("meta"):
        codec = QResVAE(arch, lossless=lossless)
    assert fit_problems(codec, lvae_state(codec, keys)) == []
    # The check has teeth: one released tensor of another shape, or one left out, is reported.
    wrong = {**keys, "decoder.bias": [1, 7, 1, 1]}
    assert any("shapes differ" in p for p in fit_problems(codec, lvae_state(codec, wrong)))
    fewer = {k: v for k, v in keys.items() if k != "decoder.dec_blocks.0.z_proj.0.weight"}
    assert any("not filled" in p for p in fit_problems(codec, lvae_state(codec, fewer)))


def test_wrong_or_foreign_files_are_refused_clearly(tmp_path):
    source = fixture_path(FAMILY, "qres34m_state_dict.pt")
    with pytest.raises(CheckpointError, match="holds a qres34m model, not qres17m"):
        import_weights("lvae", source, tmp_path / "x.ckpt", arch="qres17m")
    torch.save({"model": {"conv.weight": torch.zeros(1)}}, tmp_path / "foreign.pt")
    with pytest.raises(CheckpointError, match="not a QRes-VAE state dict"):
        import_weights("lvae", tmp_path / "foreign.pt", tmp_path / "x.ckpt")
    with pytest.raises(CheckpointError, match="huggingface.co/duanzh0"):
        import_weights("lvae", tmp_path / "qres34m-lmb16.pt", tmp_path / "x.ckpt")


def test_imported_checkpoint_warm_starts_training_with_its_ema(compose_train, tmp_path):
    codec = imported("qres34m", tmp_path)
    cfg = compose_train(
        "model=qres34m", "model.codec.N=4", "model.lmbda=16", tiny=False, sample_data=False
    )
    module = hydra.utils.instantiate(cfg.model)
    module.init_weights_from(tmp_path / "qres34m.ckpt")
    expected = torch.cat([p.flatten() for p in codec.parameters()])
    for part in (module.online, module.codec):  # the trained weights and their EMA
        assert torch.equal(torch.cat([p.flatten() for p in part.parameters()]), expected)
