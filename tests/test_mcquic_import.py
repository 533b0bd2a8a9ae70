"""McQuic against the official model: parity from the fixture, `lic import mcquic`, and the imported
checkpoint evaluated, coded and fine-tuned like one of ours."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from src.cli import main as lic
from src.codecs.importing import fit_problems, import_weights
from src.codecs.loading import load_codec
from src.codecs.mcquic import McQuic, official_architecture, official_state
from src.errors import CheckpointError
from src.evaluation.run import evaluate
from src.training import train
from tests.helpers import compose_evaluate, fixture_path

pytestmark = pytest.mark.usefixtures("one_thread")


def fixture_input() -> torch.Tensor:
    img = np.asarray(Image.open(fixture_path("mcquic", "input.png")).convert("RGB"))
    return torch.from_numpy(img.copy()).permute(2, 0, 1)[None].float() / 255


@pytest.fixture(scope="module")
def imported(tmp_path_factory):
    out = tmp_path_factory.mktemp("mcquic") / "imported.ckpt"
    _, path = import_weights("mcquic", fixture_path("mcquic", "state_dict.mcquic"), out)
    return path


def test_imported_official_model_codes_and_reconstructs_as_the_official_one(imported):
    codec = load_codec(imported)
    reference = torch.load(fixture_path("mcquic", "outputs.pt"), weights_only=True)
    x = fixture_input()
    encoded = codec.compress(x)
    codes = codec.decode_codes(encoded.streams, encoded.latent_shape)  # through rANS and back
    assert [torch.equal(a, b) for a, b in zip(codes, reference["codes"])] == [True] * 3
    expected = (reference["reconstruction"] + 1) / 2  # the official [-1, 1] scale
    x_hat = codec.decompress_bytes(codec.compress_to_bytes(x))
    assert (x_hat - expected.clamp(0, 1)).abs().max() < 1e-5
    # The same weights padded with zeros (the old convolutions) no longer agree.
    zeros = McQuic(2, 4, [32, 16, 8], padding="zeros").eval()
    zeros.load_state_dict(codec.state_dict())
    _, zero_codes, _ = zeros._encode(x, stochastic=False)
    assert not all(torch.equal(a, b) for a, b in zip(zero_codes, reference["codes"]))


@pytest.mark.parametrize(
    ("name", "size"), [("paper_keys.json", 50_558_738), ("paper_keys_qp12.json", 112_677_552)]
)
def test_every_released_key_maps_onto_ours(name, size):
    shapes = {k: tuple(v) for k, v in json.loads(fixture_path("mcquic", name).read_text()).items()}
    codec = McQuic(**official_architecture(shapes))
    assert fit_problems(codec, official_state(shapes, codec)) == []
    assert sum(p.numel() for p in codec.parameters()) == size


def test_training_checkpoint_and_bad_files(tmp_path):
    raw = torch.load(fixture_path("mcquic", "state_dict.mcquic"), weights_only=True)
    model = {f"module._compressor.{k}": v for k, v in raw["model"].items()}
    model["module._postProcess.permutePattern"] = torch.ones(4)
    torch.save({"trainer": {"_model": model}, "config": raw["config"]}, tmp_path / "saved.ckpt")
    codec, _ = import_weights("mcquic", tmp_path / "saved.ckpt", tmp_path / "a.ckpt")
    assert (codec.m, codec.N, codec.codebook_sizes) == (2, 4, [32, 16, 8])

    state = dict(raw["model"])
    state["_quantizer._decoders.1._dequantizer._codebook"] = torch.zeros(2, 16, 2)
    torch.save({"model": state}, tmp_path / "bad.mcquic")
    with pytest.raises(CheckpointError, match="_decoders.1._dequantizer._codebook differs"):
        import_weights("mcquic", tmp_path / "bad.mcquic", tmp_path / "b.ckpt")
    del state["_quantizer._decoders.1._dequantizer._codebook"], state["_decoder.6.0.weight"]
    torch.save({"model": state}, tmp_path / "bad.mcquic")
    with pytest.raises(CheckpointError, match=r"not filled.*decoder\.6\.0\.weight"):
        import_weights("mcquic", tmp_path / "bad.mcquic", tmp_path / "b.ckpt")
    torch.save({"weights": 1}, tmp_path / "other.pt")
    with pytest.raises(CheckpointError, match="not an official McQuic file"):
        import_weights("mcquic", tmp_path / "other.pt", tmp_path / "c.ckpt")
    with pytest.raises(CheckpointError, match="nothing is downloaded.*McQuic/releases"):
        import_weights("mcquic", tmp_path / "qp_2_msssim_8e954998.mcquic", tmp_path / "d.ckpt")


def test_cli_import_then_code_evaluate_and_fine_tune(tmp_path, compose_train, sample_root):
    out = tmp_path / "qp.ckpt"
    assert (
        lic(["import", "mcquic", str(fixture_path("mcquic", "state_dict.mcquic")), str(out)]) == 0
    )
    photos = tmp_path / "photos"
    for split in ("train", "val"):
        (photos / split).mkdir(parents=True)
        Image.open(fixture_path("mcquic", "input.png")).save(photos / split / "astronaut.png")
    photo = photos / "val" / "astronaut.png"
    assert lic(["compress", "--ckpt", str(out), str(photo), str(tmp_path / "a.lic")]) == 0
    assert (
        lic(["decompress", "--ckpt", str(out), str(tmp_path / "a.lic"), str(tmp_path / "a.png")])
        == 0
    )

    cfg = compose_evaluate(
        tmp_path,
        f"ckpt={out}",
        "data=folder",
        f"data.root={photos}",
    )
    (summary,) = evaluate(cfg, [str(out)]).values()
    assert summary["all_match_forward"] and summary["bpp"] > 0

    # ckpt=: a McQuic run of the same architecture starts from the imported weights.
    cfg = compose_train(
        "model=mcquic",
        "model.codec.N=4",
        "model.codec.codebook_sizes=[32,16,8]",
        f"ckpt={out}",
        f"data.root={photos}",
        "data.crop=128",
        "data.val_crop=128",
        "data.batch_size=1",
        "data.val_batch_size=1",
        "trainer.max_steps=1",
        "trainer.limit_val_batches=0",
        "logger=csv",
    )
    train(cfg)
    start, tuned = load_codec(out), load_codec(tmp_path / "run" / "checkpoints" / "last.ckpt")
    moved = [
        not torch.equal(a, b)
        for a, b in zip(start.state_dict().values(), tuned.state_dict().values())
    ]
    assert any(moved) and not all(moved)  # one step from the imported weights
