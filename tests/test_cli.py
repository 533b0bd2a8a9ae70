"""`python -m src.cli compress | decompress | inspect` on a real checkpoint."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from src.cli import main
from src.training import train
from tests.conftest import compose_config


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory, sample_root):
    out = tmp_path_factory.mktemp("cli")
    train(compose_config(out, sample_root, "print_summary=false"))
    return out / "run" / "checkpoints" / "last.ckpt"


def test_compress_inspect_decompress(checkpoint, tmp_path, capsys):
    img = np.random.default_rng(0).integers(0, 256, (37, 53, 4), dtype=np.uint8)
    Image.fromarray(img, "RGBA").save(tmp_path / "in.png")
    assert (
        main(
            [
                "compress",
                "--ckpt",
                str(checkpoint),
                str(tmp_path / "in.png"),
                str(tmp_path / "x.lic"),
            ]
        )
        == 0
    )
    assert "RGBA" in capsys.readouterr().err
    assert main(["inspect", str(tmp_path / "x.lic")]) == 0
    assert "image:        53x37" in capsys.readouterr().out
    assert (
        main(
            [
                "decompress",
                "--ckpt",
                str(checkpoint),
                str(tmp_path / "x.lic"),
                str(tmp_path / "r.png"),
            ]
        )
        == 0
    )
    assert Image.open(tmp_path / "r.png").size == (53, 37)


def test_damaged_file_gives_a_clear_error(checkpoint, tmp_path, capsys):
    x = torch.rand(40, 40, 3).mul(255).byte().numpy()
    Image.fromarray(x).save(tmp_path / "in.png")
    main(["compress", "--ckpt", str(checkpoint), str(tmp_path / "in.png"), str(tmp_path / "x.lic")])
    data = bytearray((tmp_path / "x.lic").read_bytes())
    data[len(data) // 2] ^= 1
    (tmp_path / "bad.lic").write_bytes(bytes(data))
    assert (
        main(
            [
                "decompress",
                "--ckpt",
                str(checkpoint),
                str(tmp_path / "bad.lic"),
                str(tmp_path / "r.png"),
            ]
        )
        == 2
    )
    assert "CRC32" in capsys.readouterr().err


def test_exported_codec_codes_like_its_checkpoint(checkpoint, tmp_path, capsys):
    exported = tmp_path / "model.codec"
    assert main(["export", str(checkpoint), str(exported)]) == 0
    assert exported.read_bytes()[8:9] == b"{"  # safetensors: JSON header, no pickle
    img = torch.rand(45, 61, 3).mul(255).byte().numpy()
    Image.fromarray(img).save(tmp_path / "in.png")
    files = {}
    for name, model in (("ckpt", checkpoint), ("export", exported)):
        out = tmp_path / f"{name}.lic"
        assert main(["compress", "--ckpt", str(model), str(tmp_path / "in.png"), str(out)]) == 0
        files[name] = out
    assert files["ckpt"].read_bytes() == files["export"].read_bytes()
    # A file written with the checkpoint decodes with the exported codec.
    assert (
        main(["decompress", "--ckpt", str(exported), str(files["ckpt"]), str(tmp_path / "r.png")])
        == 0
    )


def test_damaged_export_is_refused(checkpoint, tmp_path, capsys):
    exported = tmp_path / "model.codec"
    main(["export", str(checkpoint), str(exported)])
    data = bytearray(exported.read_bytes())
    data[-100] ^= 0xFF  # inside the weights
    (tmp_path / "bad.codec").write_bytes(bytes(data))
    Image.fromarray(torch.zeros(16, 16, 3).byte().numpy()).save(tmp_path / "in.png")
    bad = ["--ckpt", str(tmp_path / "bad.codec"), str(tmp_path / "in.png"), str(tmp_path / "x")]
    assert main(["compress", *bad]) == 2
    assert "fingerprint" in capsys.readouterr().err


def test_tiled_compress_from_the_cli(checkpoint, tmp_path, capsys):
    img = torch.rand(70, 90, 3).mul(255).byte().numpy()
    Image.fromarray(img).save(tmp_path / "in.png")
    args = ["--ckpt", str(checkpoint)]
    assert (
        main(["compress", *args, "--tile", "64", str(tmp_path / "in.png"), str(tmp_path / "t.lic")])
        == 0
    )
    assert main(["inspect", str(tmp_path / "t.lic")]) == 0
    assert "2x2 of 64 px" in capsys.readouterr().out
    assert main(["decompress", *args, str(tmp_path / "t.lic"), str(tmp_path / "r.png")]) == 0
    assert Image.open(tmp_path / "r.png").size == (90, 70)


def test_python_api_codes_files_and_tensors(checkpoint, tmp_path):
    from src.api import compress_file, decompress_file, export_codec, load_codec

    codec = load_codec(export_codec(load_codec(checkpoint), tmp_path / "m.codec"))
    Image.fromarray(torch.rand(33, 47, 3).mul(255).byte().numpy()).save(tmp_path / "in.png")
    data = compress_file(codec, tmp_path / "in.png", tmp_path / "out.lic")
    assert decompress_file(codec, tmp_path / "out.lic", tmp_path / "rec.png") == (47, 33)
    x = torch.rand(1, 3, 33, 47)
    assert codec.decompress_bytes(codec.compress_to_bytes(x)).shape == x.shape
    assert len(data) == (tmp_path / "out.lic").stat().st_size
