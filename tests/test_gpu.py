"""Checks that need CUDA; skipped on CPU-only machines (CI has none)."""

from __future__ import annotations

import pytest
import torch

from src.training import train

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]


@pytest.mark.parametrize("precision", ["32-true", "bf16-mixed"])
def test_training_on_gpu(compose_train, tmp_path, precision):
    if precision == "bf16-mixed" and not torch.cuda.is_bf16_supported():
        pytest.skip("no bf16 on this GPU")
    cfg = compose_train("trainer=gpu", f"trainer.precision={precision}")
    metrics = train(cfg)
    assert torch.isfinite(torch.tensor(metrics["val/loss"]))
    assert (tmp_path / "run" / "checkpoints" / "last.ckpt").is_file()


def test_coding_on_gpu_round_trips():
    from src.codecs.compressai_zoo import CompressAICodec

    codec = CompressAICodec("bmshj2018-hyperprior", quality=1, N=16, M=16).cuda().eval()
    codec.prepare_for_coding()
    x = torch.rand(1, 3, 64, 96, device="cuda")
    assert codec.decompress(codec.compress(x)).shape == x.shape
