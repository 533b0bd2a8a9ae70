"""Reading checkpoints: weights for warm starts, and finding the run to resume."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from src.errors import CheckpointError


def read_checkpoint(path: str | Path) -> dict:
    """Load a Lightning checkpoint onto the CPU, or raise `CheckpointError` saying why not."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist")
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # a truncated or foreign file: say which, not how torch failed
        raise CheckpointError(f"checkpoint {path} cannot be read: {err}") from err
    if not isinstance(checkpoint, dict) or "state_dict" not in checkpoint:
        raise CheckpointError(f"{path} is not a training checkpoint (it has no 'state_dict')")
    return checkpoint


def load_weights(module: nn.Module, path: str | Path, strict: bool = True) -> dict:
    """Initialise `module`'s weights from a checkpoint; the optimiser and step start afresh.

    A checkpoint of another codec (other names or shapes) is refused with the keys that differ.
    Returns the checkpoint dict for callers that need more of it.
    """
    checkpoint = read_checkpoint(path)
    codec_name = checkpoint.get("codec_name")
    expected = getattr(getattr(module, "codec", None), "name", None)
    if codec_name and expected and codec_name != expected:
        raise CheckpointError(
            f"checkpoint {path} holds a {codec_name} codec, this run builds {expected}"
        )
    load_state_checked(module, checkpoint["state_dict"], f"checkpoint {path}", strict)
    return checkpoint


def load_state_checked(module: nn.Module, state: dict, source: str, strict: bool = True) -> None:
    """Load `state` into `module`, refusing (with the keys that differ) a state of another shape.

    `source` names where the state came from in the error. Recipes that warm-start from a
    related model (QVRF from a fixed-rate one) adapt the state first and load it through here.
    """
    own = module.state_dict()
    # Parameters must match; buffers may not (coding tables change size once built, and every
    # Codec resizes its buffers to the incoming ones while loading).
    shape_diff = [
        f"{k} {tuple(state[k].shape)} vs {tuple(p.shape)}"
        for k, p in module.named_parameters()
        if k in state and state[k].shape != p.shape
    ]
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    if shape_diff or (strict and (missing or unexpected)):
        details = "; ".join(
            part
            for part in (
                f"different shapes: {', '.join(shape_diff[:3])}" if shape_diff else "",
                f"missing: {', '.join(missing[:3])}" if strict and missing else "",
                f"unexpected: {', '.join(unexpected[:3])}" if strict and unexpected else "",
            )
            if part
        )
        raise CheckpointError(f"{source} does not fit this codec ({details})")
    module.load_state_dict(state, strict=strict)


def newest_last_checkpoint(runs_dir: str | Path, exclude: str | Path | None = None) -> Path:
    """The most recent `checkpoints/last.ckpt` among the run directories in `runs_dir`."""
    runs_dir = Path(runs_dir)
    exclude = Path(exclude).resolve() if exclude else None
    candidates = [
        p
        for p in runs_dir.glob("*/checkpoints/last.ckpt")
        if exclude is None or p.parent.parent.resolve() != exclude
    ]
    if not candidates:
        raise CheckpointError(
            f"resume=true found no checkpoints/last.ckpt under {runs_dir}; "
            "pass resume=PATH/TO/last.ckpt to name one"
        )
    return max(candidates, key=lambda p: p.stat().st_mtime)
