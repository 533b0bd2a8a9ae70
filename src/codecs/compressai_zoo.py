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
from pathlib import Path

import torch
from compressai.ans import RansDecoder, RansEncoder
from compressai.entropy_models import EntropyBottleneck
from compressai.models import JointAutoregressiveHierarchicalPriors
from compressai.zoo.image import cfgs, model_architectures, model_urls
from compressai.zoo.pretrained import load_pretrained
from torch import Tensor, nn

from src.codecs import context_model
from src.codecs.base import Codec, CodecOutput
from src.codecs.importing import (
    ImportRequest,
    fit_state,
    read_torch_file,
    register_format,
    rename_state,
)
from src.coding.container import CODING_ORDERS
from src.errors import CheckpointError, LicError

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
        self.autoregressive = isinstance(self.net, JointAutoregressiveHierarchicalPriors)
        if self.autoregressive:  # wavefronts by default; raster for byte parity with CompressAI
            self.coding_orders = CODING_ORDERS
            self.coding_order = "wavefront"

    def set_coding_options(self, coding_order: str | None = None, **options) -> None:
        """`coding_order`: "wavefront" (default) or "raster" (CompressAI's own, byte for byte)
        for the autoregressive models."""
        super().set_coding_options(**options)
        if coding_order is not None:
            if coding_order not in self.coding_orders:
                raise LicError(
                    f"{self.name} codes in {' or '.join(self.coding_orders)} order, "
                    f"not {coding_order!r}"
                )
            self.coding_order = coding_order

    def _forward_padded(self, x: Tensor) -> CodecOutput:
        out = self.net(x)
        bits = {name: bits_from_likelihoods(lik) for name, lik in out["likelihoods"].items()}
        return CodecOutput(x_hat=out["x_hat"], bits=bits)

    def _compress_padded(self, x: Tensor) -> tuple[list[bytes], tuple[int, ...]]:
        if self.coding_order == "wavefront":
            net = self.net
            y = net.g_a(x)
            z = net.h_a(y)
            z_strings = net.entropy_bottleneck.compress(z)
            params = net.h_s(net.entropy_bottleneck.decompress(z_strings, z.shape[-2:]))
            _, q, scales, _ = self._walk_round(y, params)
            return [self._walk_stream(q, scales), z_strings[0]], tuple(z.shape[-2:])
        out = self.net.compress(x)
        streams = [group[0] for group in out["strings"]]
        return streams, tuple(int(s) for s in out["shape"])

    def _decompress_padded(self, streams: list[bytes], latent_shape: tuple[int, ...]) -> Tensor:
        if self.coding_order == "wavefront":
            net = self.net
            z_hat = net.entropy_bottleneck.decompress([streams[1]], torch.Size(latent_shape))
            return net.g_s(self._walk_read(streams[0], net.h_s(z_hat)))
        out = self.net.decompress([[s] for s in streams], torch.Size(latent_shape))
        return out["x_hat"]

    # ---- the context model's wavefront walk (src/codecs/context_model.py) ----------------------
    def _walk_round(
        self, y: Tensor, params: Tensor, gain: Tensor | float = 1.0
    ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """ŷ, the symbols q = round(gain · (y − μ)), the scales and the means, wavefront by
        wavefront (gain 1: CompressAI's quantiser; QVRF passes its gain)."""

        def round_here(scales: Tensor, means: Tensor, rows: Tensor, cols: Tensor):
            q = torch.round(gain * (y[:, :, rows, cols].transpose(1, 2) - means))
            return q, q / gain + means

        net = self.net
        return context_model.walk(
            params, net.context_prediction, net.entropy_parameters, round_here
        )

    def _walk_stream(self, q: Tensor, scales: Tensor, gain: Tensor | float = 1.0) -> bytes:
        """The y stream: symbols in the walk's order, under N(0, gain · σ)."""
        order = context_model.wavefront_order(*q.shape[-2:]).to(q.device)
        indexes = self.net.gaussian_conditional.build_indexes(gain * scales)
        symbols, indexes = (t[0].flatten(1)[:, order].T.reshape(-1) for t in (q, indexes))
        return RansEncoder().encode_with_indexes(
            symbols.int().tolist(), indexes.int().tolist(), *self._tables()
        )

    def _walk_read(self, stream: bytes, params: Tensor, gain: Tensor | float = 1.0) -> Tensor:
        """ŷ read back from a y stream written by `_walk_stream`."""
        conditional = self.net.gaussian_conditional
        decoder = RansDecoder()
        decoder.set_stream(stream)
        tables = self._tables()

        def read_here(scales: Tensor, means: Tensor, rows: Tensor, cols: Tensor):
            indexes = conditional.build_indexes(gain * scales).reshape(-1).int().tolist()
            q = torch.tensor(decoder.decode_stream(indexes, *tables), dtype=scales.dtype)
            q = q.to(scales.device).reshape(scales.shape)
            return q, q / gain + means

        net = self.net
        return context_model.walk(
            params, net.context_prediction, net.entropy_parameters, read_here
        )[0]

    def _tables(self) -> tuple[list, list, list]:
        """The Gaussian conditional's CDF tables, lengths and offsets as the rANS coder takes them."""
        conditional = self.net.gaussian_conditional
        return (
            conditional.quantized_cdf.tolist(),
            conditional.cdf_length.reshape(-1).int().tolist(),
            conditional.offset.reshape(-1).int().tolist(),
        )

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


# ---- CompressAI's published zoo weights ----------------------------------------------------------
# Every zoo file, by its published name: (architecture, metric, quality).
ZOO_FILES = {
    url.rsplit("/", 1)[1]: (arch, metric, quality)
    for arch, by_metric in model_urls.items()
    for metric, by_quality in by_metric.items()
    for quality, url in by_quality.items()
}


def zoo_cache_dirs() -> list[Path]:
    """Where torch.hub keeps downloaded zoo files ($TORCH_HOME/hub/checkpoints)."""
    return [Path(torch.hub.get_dir()) / "checkpoints"]


# The entropy bottleneck's parameter lists as CompressAI releases name them: `_matrices.0` (the
# zoo's files, which `load_pretrained` turns into the next form), `_matrix0` (CompressAI 1.1,
# e.g. QVRF's release) and `matrices.0` (CompressAI 1.2, ours).
_BOTTLENECK_KEYS = [
    (rf"\._{old}(\d+)$", rf".{new}.\1")
    for old, new in (("matrix", "matrices"), ("bias", "biases"), ("factor", "factors"))
]


def compressai_state(state: dict[str, Tensor]) -> dict[str, Tensor]:
    """A state dict written by any CompressAI version under CompressAI 1.2's key names: the
    zoo's own conversion (DataParallel prefixes, `downsample` -> `skip`, old parameter lists),
    then the bottleneck's `_matrix0` -> `matrices.0` that CompressAI itself applies only while
    loading (and that an exact-fit check must see first)."""
    return rename_state(load_pretrained(state), _BOTTLENECK_KEYS)


def zoo_widths(arch: str, state: dict[str, Tensor]) -> tuple[int, int | None]:
    """(N, M) of a zoo state dict, read off its first layers as CompressAI's `from_state_dict`
    does (Cheng 2020 has N alone)."""
    if arch.startswith("cheng2020"):
        return int(state["g_a.0.conv1.weight"].shape[0]), None
    return int(state["g_a.0.weight"].shape[0]), int(state["g_a.6.weight"].shape[0])


def describe_zoo_file(request: ImportRequest) -> tuple[str, int]:
    """(arch, quality) of a zoo file: from its published name, or from --arch/--quality (which
    win, and are needed for a renamed file)."""
    arch, _metric, quality = ZOO_FILES.get(request.source.name, (None, None, None))
    arch = request.arch or arch
    quality = request.quality or quality
    if arch is None or quality is None:
        raise CheckpointError(
            f"{request.source.name} is not a published CompressAI zoo file name; "
            "say which model it holds with --arch ARCH --quality Q"
        )
    if arch not in model_architectures:
        arch = arch.replace("_", "-")
    if arch not in model_architectures:
        raise CheckpointError(f"unknown CompressAI architecture {arch!r}; one of {ARCHITECTURES}")
    if quality not in cfgs[arch]:
        raise CheckpointError(f"{arch} has qualities {sorted(cfgs[arch])}, not {quality}")
    return arch, quality


@register_format(
    "compressai",
    published_at="CompressAI's model zoo (compressai.zoo; the URLs are in compressai/zoo/image.py)",
    search_dirs=zoo_cache_dirs,
    help="CompressAI zoo .pth.tar files of the six baselines, MSE and MS-SSIM",
)
def import_compressai(request: ImportRequest) -> CompressAICodec:
    """A zoo state dict (any of the six architectures) as our `CompressAICodec`.

    Old key names are converted first (`compressai_state`); widths
    other than the quality's table (a fine-tuned or tiny model) are kept as N/M overrides."""
    arch, quality = describe_zoo_file(request)
    state = read_torch_file(request.source, "a CompressAI state dict")
    if isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]  # CompressAI's examples/train.py saves a dict around it
    state = compressai_state(state)
    try:
        n, m = zoo_widths(arch, state)
    except KeyError as err:
        raise CheckpointError(f"{request.source} is not a {arch} state dict (no {err})") from err
    table = cfgs[arch][quality]
    codec = CompressAICodec(
        arch,
        quality,
        N=None if n == table[0] else n,
        M=None if m is None or m == table[1] else m,
    )
    fit_state(codec, rename_state(state, [(r"^", "net.")]), str(request.source))
    return codec
