"""Rebuild a coding-ready codec from a training checkpoint or an exported file, without the recipe
around it."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import hydra

from src.codecs.base import Codec
from src.codecs.export import is_exported, load_exported
from src.errors import CheckpointError
from src.utils.checkpoints import read_checkpoint

CODEC_PREFIX = "codec."


def store_codec(checkpoint: dict[str, Any], codec: Codec) -> None:
    """Put a coding-ready `codec` into `checkpoint`: its state under `codec.` (tables built) and
    the name and config that `load_codec` rebuilds it from. Training and imports write it alike."""
    codec.prepare_for_coding()
    checkpoint.setdefault("state_dict", {}).update(codec.state_dict(prefix=CODEC_PREFIX))
    checkpoint["codec_name"] = codec.name
    checkpoint["codec_config"] = codec.config()


def load_codec(path: str | Path, device: str = "cpu") -> Codec:
    """The codec stored in a checkpoint or an exported file, in eval mode, ready to code."""
    if not Path(path).is_file():
        raise CheckpointError(f"checkpoint {path} does not exist")
    if is_exported(path):
        return load_exported(path, device)
    checkpoint = read_checkpoint(path)
    config = checkpoint.get("codec_config")
    if not config:
        raise CheckpointError(
            f"checkpoint {path} does not say which codec it holds (no codec_config)"
        )
    try:
        codec: Codec = hydra.utils.instantiate(config)
    except Exception as err:
        raise CheckpointError(
            f"checkpoint {path}: cannot rebuild codec {config.get('_target_')}: {err}"
        ) from err
    state = {
        k[len(CODEC_PREFIX) :]: v
        for k, v in checkpoint["state_dict"].items()
        if k.startswith(CODEC_PREFIX)
    }
    try:
        codec.load_state_dict(state)
    except RuntimeError as err:
        raise CheckpointError(
            f"checkpoint {path} does not fit its own codec config: {err}"
        ) from err
    codec.to(device).eval()
    codec.prepare_for_coding()
    return codec
