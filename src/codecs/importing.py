"""Released weights of a paper's authors as ordinary checkpoints of ours: one command, a registry.

    lic import FORMAT SRC OUT.ckpt [--arch A] [--quality Q] [--metric mse|ms-ssim]

Each family's module registers the formats it reads with `@register_format(...)`: a function that
takes an `ImportRequest` and returns a codec of ours with the authors' weights in it. Those
functions are built from two shared pieces: `rename_state` (an ordered list of regular-expression
rules from the authors' key names to ours) and `fit_state` (every source key used, every key of
ours filled, every shape equal, or a `CheckpointError` listing what differs). `import_weights`
then writes the result as a checkpoint that `evaluate.py`, `lic compress` and `ckpt=` read like any
other. Formats are found by importing the modules of `src.codecs`, so adding a family's importer
touches only that family's file.
"""

from __future__ import annotations

import hashlib
import importlib
import pkgutil
import re
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import torch
from torch import Tensor

from src.codecs.base import Codec
from src.codecs.loading import store_codec
from src.errors import CheckpointError

V = TypeVar("V")


@dataclass(frozen=True)
class ImportRequest:
    """What the user asked for: the authors' file and the model it holds (where the file alone
    does not say)."""

    source: Path
    arch: str | None = None
    quality: int | None = None
    metric: str = "mse"
    options: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class ImportFormat:
    """One released-weights format: its reader and where the authors publish the files."""

    name: str
    read: Callable[[ImportRequest], Codec]
    published_at: str
    search_dirs: Callable[[], list[Path]] = list
    help: str = ""


FORMATS: dict[str, ImportFormat] = {}


def register_format(
    name: str,
    published_at: str,
    search_dirs: Callable[[], list[Path]] = list,
    help: str = "",
) -> Callable[[Callable[[ImportRequest], Codec]], Callable[[ImportRequest], Codec]]:
    """Register `fn(request) -> Codec` as the reader of format `name`.

    `published_at` tells a user without the file where to get it; `search_dirs` lists the folders
    a bare file name is looked up in (CompressAI's: the torch hub cache)."""

    def decorate(fn: Callable[[ImportRequest], Codec]) -> Callable[[ImportRequest], Codec]:
        if name in FORMATS and FORMATS[name].read is not fn:
            raise RuntimeError(f"import format {name!r} is registered twice")
        FORMATS[name] = ImportFormat(name, fn, published_at, search_dirs, help)
        return fn

    return decorate


def discover_formats() -> dict[str, ImportFormat]:
    """Every registered format, after importing each module of `src.codecs` once."""
    import src.codecs as package

    for module in pkgutil.iter_modules(package.__path__):
        importlib.import_module(f"{package.__name__}.{module.name}")
    return FORMATS


def get_format(name: str) -> ImportFormat:
    """The format called `name`, or a `CheckpointError` listing the known ones."""
    formats = discover_formats()
    if name not in formats:
        raise CheckpointError(
            f"unknown import format {name!r}; known formats: {', '.join(sorted(formats))}"
        )
    return formats[name]


def torch_hub_checkpoint_dirs() -> list[Path]:
    """Where torch.hub keeps downloaded weight files ($TORCH_HOME/hub/checkpoints): the cache of
    the authors' own download helpers (CompressAI's zoo, McQuic's demo)."""
    return [Path(torch.hub.get_dir()) / "checkpoints"]


def resolve_source(fmt: ImportFormat, source: str | Path) -> Path:
    """The file to read: `source` itself, else a file of that name in the format's search
    folders, else a `CheckpointError` saying where the authors publish it."""
    path = Path(source).expanduser()
    if path.is_file():
        return path
    for folder in fmt.search_dirs():
        candidate = Path(folder) / path.name
        if candidate.is_file():
            return candidate
    looked = [str(path)] + [str(Path(d) / path.name) for d in fmt.search_dirs()]
    raise CheckpointError(
        f"{fmt.name} weights {source} not found (looked in: {', '.join(looked)}); "
        f"nothing is downloaded: get the file from {fmt.published_at} and pass its path"
    )


def read_torch_file(path: Path, what: str) -> Any:
    """`torch.load` a released file onto the CPU, trusting no pickled code first.

    Released files are mostly plain tensors; a file that needs arbitrary unpickling is refused
    rather than executed."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:
        raise CheckpointError(f"{path} cannot be read as {what}: {err}") from err


def rename_state(
    state: Mapping[str, V], rules: Iterable[tuple[str, str]], drop: Iterable[str] = ()
) -> dict[str, V]:
    """The authors' state dict (or key -> shape list) under our names.

    `rules` are (pattern, replacement) pairs of `re.sub`, applied in order to every key; keys that
    fully match a `drop` pattern (training-only buffers of the source, say) are left out."""
    compiled = [(re.compile(p), r) for p, r in rules]
    dropped = [re.compile(p) for p in drop]
    out: dict[str, V] = {}
    for key, value in state.items():
        if any(d.fullmatch(key) for d in dropped):
            continue
        new = key
        for pattern, replacement in compiled:
            new = pattern.sub(replacement, new)
        if new in out:
            raise CheckpointError(f"two source keys map to {new!r} (one of them is {key!r})")
        out[new] = value
    return out


def fit_problems(codec: Codec, state: Mapping[str, Any]) -> list[str]:
    """What keeps `state` (under our names; tensors, or shapes as from a key/shape list) from
    fitting `codec` exactly: our keys left unfilled, source keys left unused, parameter shapes
    that differ. Empty when it fits. Buffers may differ in shape: coding tables are rebuilt by
    `prepare_for_coding`."""
    own = codec.state_dict()
    params = dict(codec.named_parameters())
    missing = sorted((k for k in own if k not in state), key=lambda k: (k not in params, k))
    unused = sorted(k for k in state if k not in own)
    shapes = sorted(
        f"{k} {tuple(getattr(state[k], 'shape', state[k]))} vs ours {tuple(p.shape)}"
        for k, p in params.items()
        if k in state and tuple(getattr(state[k], "shape", state[k])) != tuple(p.shape)
    )
    problems = []
    if missing:
        problems.append(f"{len(missing)} of our keys not filled (e.g. {', '.join(missing[:4])})")
    if unused:
        problems.append(f"{len(unused)} source keys unused (e.g. {', '.join(unused[:4])})")
    if shapes:
        problems.append(f"shapes differ: {'; '.join(shapes[:4])}")
    return problems


def fit_state(codec: Codec, state: Mapping[str, Tensor], source: str) -> None:
    """Load `state` (already under our names) into `codec`, refusing anything but a perfect fit
    (`fit_problems`) with a `CheckpointError` that says what differs."""
    problems = fit_problems(codec, state)
    if problems:
        raise CheckpointError(f"{source} does not fit {codec.name}: {'; '.join(problems)}")
    codec.load_state_dict(dict(state))


def sha256_of(path: Path) -> str:
    """The SHA-256 of a file, hex (recorded in the checkpoint: which release it came from)."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def codec_checkpoint(codec: Codec, provenance: dict[str, Any] | None = None) -> dict[str, Any]:
    """A checkpoint of ours holding `codec` alone, coding-ready: what training writes, minus the
    optimiser and loop state (so `ckpt=` fine-tunes from it and `resume=` refuses it)."""
    checkpoint: dict[str, Any] = {}
    store_codec(checkpoint, codec)
    if provenance:
        checkpoint["imported_from"] = provenance
    return checkpoint


def import_weights(
    format_name: str,
    source: str | Path,
    output: str | Path,
    arch: str | None = None,
    quality: int | None = None,
    metric: str = "mse",
    options: dict[str, Any] | None = None,
) -> tuple[Codec, Path]:
    """Read the authors' file `source` in format `format_name` and write our checkpoint `output`.

    Returns the codec (eval mode, coding-ready) and the path written."""
    fmt = get_format(format_name)
    path = resolve_source(fmt, source)
    request = ImportRequest(path, arch, quality, metric, dict(options or {}))
    codec = fmt.read(request).eval()
    provenance = {
        "format": format_name,
        "source": path.name,
        "sha256": sha256_of(path),
        "arch": arch,
        "quality": quality,
        "metric": metric,
    }
    checkpoint = codec_checkpoint(codec, provenance)
    output = Path(output)
    output.parent.mkdir(parents=True, exist_ok=True)
    torch.save(checkpoint, output)
    return codec, output
