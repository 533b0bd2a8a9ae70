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
