"""CompressAI's image models behind the framework's codec contract.

One class serves every architecture of CompressAI's zoo: Ballé's factorized and scale hyperprior,
Minnen's mean-scale and joint autoregressive models, and Cheng 2020 anchor / attention. Widths
come from CompressAI's per-quality table unless `N` / `M` are given (tiny widths for tests, CPU
widths for the quick start).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterator

import torch
from compressai.entropy_models import EntropyBottleneck
from compressai.zoo.image import cfgs, model_architectures
from torch import Tensor, nn

from src.codecs.base import Codec, CodecOutput
from src.coding.rans import pad_for_decoding

log = logging.getLogger(__name__)

ARCHITECTURES = tuple(model_architectures)


def bits_from_likelihoods(likelihoods: Tensor) -> Tensor:
    """Per-image bits, shape (B,), of a likelihood tensor (B, ...): -sum log2 p."""
    return -torch.log(likelihoods).flatten(1).sum(dim=1) / math.log(2)


class CompressAICodec(Codec):
    """A CompressAI zoo architecture, built from scratch (never downloaded).

    Args:
        arch: CompressAI's name, e.g. "bmshj2018-hyperprior", "mbt2018-mean", "cheng2020-attn".
        quality: 1..8 (1..6 for cheng2020); picks (N, M) from CompressAI's table.
        N, M: override the widths of the table (cheng2020 has N alone and ignores M).
    """

    def __init__(self, arch: str, quality: int = 3, N: int | None = None, M: int | None = None):
        super().__init__()
        if arch not in model_architectures:
            raise ValueError(
                f"unknown CompressAI architecture {arch!r}; choose one of {ARCHITECTURES}"
            )
        table = cfgs[arch.replace("_", "-")] if arch.replace("_", "-") in cfgs else cfgs[arch]
        if quality not in table:
            raise ValueError(f"{arch} has qualities {sorted(table)}, not {quality}")
        widths = list(table[quality])
        if N is not None:
            widths[0] = N
        if M is not None and len(widths) > 1:
            widths[1] = M
        elif M is not None:
            log.info("%s has a single width N; M=%s is not used", arch, M)
        self._record_config(arch=arch, quality=quality, N=N, M=M)
        self.arch = arch
        self.name = arch
        self.quality = quality
        self.net = model_architectures[arch](*widths)
        self.stride = int(self.net.downsampling_factor)
        # Expected in a file: y alone (factorized), or y and the hyperlatent z.
        self.num_streams = 2 if hasattr(self.net, "gaussian_conditional") else 1

    def _forward_padded(self, x: Tensor) -> CodecOutput:
        out = self.net(x)
        bits = {name: bits_from_likelihoods(lik) for name, lik in out["likelihoods"].items()}
        return CodecOutput(x_hat=out["x_hat"], bits=bits)

    def _compress_padded(self, x: Tensor) -> tuple[list[bytes], tuple[int, ...]]:
        out = self.net.compress(x)
        streams = [group[0] for group in out["strings"]]
        return streams, tuple(int(s) for s in out["shape"])

    def _decompress_padded(self, streams: list[bytes], latent_shape: tuple[int, ...]) -> Tensor:
        context = getattr(self.net, "context_prediction", None)
        if context is not None:  # CompressAI's raster decoder reads y with a RansDecoder of its own
            h, w = latent_shape
            y_symbols = context.in_channels * (4 * h) * (4 * w)
            streams = [pad_for_decoding(streams[0], y_symbols), *streams[1:]]
        out = self.net.decompress([[s] for s in streams], torch.Size(latent_shape))
        return out["x_hat"]

    def prepare_for_coding(self) -> None:
        self.net.update(force=True)

    def aux_loss(self) -> Tensor:
        return self.net.aux_loss()

    def aux_parameters(self) -> Iterator[nn.Parameter]:
        return (p for n, p in self.net.named_parameters() if n.endswith("quantiles"))

    def entropy_parameters(self) -> Iterator[nn.Parameter]:
        for module in self.net.modules():
            if isinstance(module, EntropyBottleneck):
                yield from (p for n, p in module.named_parameters() if n != "quantiles")
