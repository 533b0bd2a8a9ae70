"""Self-contained inference files: a codec without Lightning, its recipe, or pickle.

An exported codec is one safetensors file. Its tensors are the floating-point weights; its
metadata header holds JSON: the Hydra config that rebuilds the codec, the integer coding tables
(CompressAI's quantised CDFs, offsets, lengths) as plain lists, and the container fingerprint,
which is checked after loading so a damaged or edited file is refused. Files coded with the
training checkpoint decode with the exported codec and the other way round: both have the same
fingerprint.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path
from typing import Any

import hydra
import torch
from safetensors import SafetensorError
from safetensors.torch import safe_open, save_file

from src.codecs.base import Codec
from src.errors import CheckpointError

FORMAT = "lic-codec"
VERSION = 1


def export_codec(codec: Codec, path: str | Path) -> Path:
    """Write `codec` (prepared for coding first) as a self-contained safetensors file."""
    codec.prepare_for_coding()
    weights, tables = {}, {}
    for name, tensor in codec.state_dict().items():
        tensor = tensor.detach().cpu().contiguous()
        if tensor.is_floating_point():
            weights[name] = tensor.clone()
        else:
            tables[name] = {
                "dtype": str(tensor.dtype).removeprefix("torch."),
                "shape": list(tensor.shape),
                "values": tensor.flatten().tolist(),
            }
    header = {
        "format": FORMAT,
        "version": VERSION,
        "codec_name": codec.name,
        "config": codec.config(),
        "coding_tables": tables,
        "fingerprint": codec.fingerprint().hex(),
    }
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(weights, str(path), metadata={"lic": json.dumps(header, default=str)})
    return path


def is_exported(path: str | Path) -> bool:
    """Whether `path` is a safetensors file (rather than a Lightning checkpoint, a zip)."""
    with open(path, "rb") as f:
        head = f.read(9)
    if len(head) < 9:
        return False
    (header_len,) = struct.unpack("<Q", head[:8])
    return head[8:9] == b"{" and 0 < header_len < 1 << 28


def load_exported(path: str | Path, device: str = "cpu") -> Codec:
    """Rebuild the codec of an exported file, in eval mode, ready to code."""
    try:
        with safe_open(str(path), framework="pt") as f:
            metadata = f.metadata() or {}
            weights = {name: f.get_tensor(name) for name in f.keys()}
    except (SafetensorError, OSError, ValueError) as err:
        raise CheckpointError(f"{path} is not a readable exported codec: {err}") from err
    try:
        header: dict[str, Any] = json.loads(metadata["lic"])
    except (KeyError, json.JSONDecodeError) as err:
        raise CheckpointError(f"{path} is a safetensors file but not an exported codec") from err
    if header.get("format") != FORMAT or header.get("version") != VERSION:
        raise CheckpointError(
            f"{path}: format {header.get('format')} v{header.get('version')} is not "
            f"{FORMAT} v{VERSION}"
        )
    state = dict(weights)
    for name, table in header["coding_tables"].items():
        dtype = getattr(torch, table["dtype"])
        state[name] = torch.tensor(table["values"], dtype=dtype).reshape(table["shape"])
    try:
        codec: Codec = hydra.utils.instantiate(header["config"])
        codec.load_state_dict(state)
    except Exception as err:
        raise CheckpointError(f"{path}: cannot rebuild its codec: {err}") from err
    if codec.fingerprint().hex() != header["fingerprint"]:
        raise CheckpointError(f"{path}: weights do not match the fingerprint it was exported with")
    return codec.to(device).eval()
