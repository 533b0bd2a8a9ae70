"""An image encoded in one process with 1 thread decodes bit-exactly in another with 2 threads.

CompressAI's issues #279 / #309 show what breaks when the decoder's entropy parameters differ by
one ulp from the encoder's; this runs the two sides as separate processes, as real use does.
"""

from __future__ import annotations

import subprocess
import sys

import torch

from src.codecs.compressai_zoo import CompressAICodec
from tests.helpers import REPO

SIDE = """
import sys, torch
from src.codecs.loading import load_codec
torch.set_num_threads(int(sys.argv[2]))
codec = load_codec(sys.argv[1])
if sys.argv[3] == "encode":
    x = torch.load(sys.argv[4])
    open(sys.argv[5], "wb").write(codec.compress_to_bytes(x))
else:
    torch.save(codec.decompress_bytes(open(sys.argv[4], "rb").read()), sys.argv[5])
"""


def test_encode_with_one_thread_decode_with_two_in_other_processes(tmp_path):
    torch.manual_seed(0)
    codec = CompressAICodec("mbt2018-mean", quality=1, N=16, M=16).eval()
    codec.prepare_for_coding()
    checkpoint = {
        "state_dict": {f"codec.{k}": v for k, v in codec.state_dict().items()},
        "codec_config": codec.config(),
        "codec_name": codec.name,
    }
    torch.save(checkpoint, tmp_path / "codec.ckpt")
    torch.save(torch.rand(1, 3, 96, 130), tmp_path / "x.pt")

    def side(*args: str) -> None:
        proc = subprocess.run(
            [sys.executable, "-c", SIDE, str(tmp_path / "codec.ckpt"), *args],
            cwd=REPO,
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert proc.returncode == 0, proc.stderr[-2000:]

    side("1", "encode", str(tmp_path / "x.pt"), str(tmp_path / "x.lic"))
    side("2", "decode", str(tmp_path / "x.lic"), str(tmp_path / "a.pt"))
    side("1", "decode", str(tmp_path / "x.lic"), str(tmp_path / "b.pt"))
    a, b = torch.load(tmp_path / "a.pt"), torch.load(tmp_path / "b.pt")
    assert a.shape == (1, 3, 96, 130)
    assert torch.equal(a, b)
