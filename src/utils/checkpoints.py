"""Reading checkpoints: weights for warm starts, and finding the run to resume."""

from __future__ import annotations

import re
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


def load_weights(module: nn.Module, path: str | Path) -> None:
    """Initialise `module`'s weights from a checkpoint; the optimiser and step start afresh."""
    load_checkpoint_weights(module, read_checkpoint(path), f"checkpoint {path}")


def load_checkpoint_weights(module: nn.Module, checkpoint: dict, source: str) -> None:
    """Load an already read checkpoint's weights into `module`.

    A checkpoint of another codec (other names or shapes) is refused with the keys that differ.
    """
    codec_name = checkpoint.get("codec_name")
    expected = getattr(getattr(module, "codec", None), "name", None)
    if codec_name and expected and codec_name != expected:
        raise CheckpointError(f"{source} holds a {codec_name} codec, this run builds {expected}")
    load_state_checked(module, checkpoint["state_dict"], source)


def load_state_checked(module: nn.Module, state: dict, source: str) -> None:
    """Load `state` into `module`, refusing (with the keys that differ) a state of another shape.

    `source` names where the state came from in the error. Recipes that warm-start from a
    related model (QVRF from a fixed-rate one) adapt the state first and load it through here.
    Keys under the recipe's `starts_fresh` prefixes (e.g. HiFIC's discriminator, absent from its
    rate-distortion stage) may be missing or extra: those parts keep their initialisation.
    """
    fresh = tuple(getattr(module, "starts_fresh", ()))
    own = module.state_dict()
    # Parameters must match; buffers may not (coding tables change size once built, and every
    # Codec resizes its buffers to the incoming ones while loading).
    shape_diff = [
        f"{k} {tuple(state[k].shape)} vs {tuple(p.shape)}"
        for k, p in module.named_parameters()
        if k in state and state[k].shape != p.shape
    ]
    missing = [k for k in own if k not in state and not k.startswith(fresh)]
    unexpected = [k for k in state if k not in own and not k.startswith(fresh)]
    if shape_diff or missing or unexpected:
        details = "; ".join(
            part
            for part in (
                f"different shapes: {', '.join(shape_diff[:3])}" if shape_diff else "",
                f"missing: {', '.join(missing[:3])}" if missing else "",
                f"unexpected: {', '.join(unexpected[:3])}" if unexpected else "",
            )
            if part
        )
        raise CheckpointError(f"{source} does not fit this codec ({details})")
    module.load_state_dict({k: v for k, v in state.items() if k in own}, strict=not fresh)


# Lightning's name for the checkpoint a requeued SLURM job restores: hpc_ckpt_<n>.ckpt in the
# run directory. The framework writes the same name when any run stops on a signal.
INTERRUPTED_PATTERN = re.compile(r"hpc_ckpt_(\d+)\.ckpt")


def interrupted_checkpoints(run_dir: str | Path) -> list[Path]:
    """The `hpc_ckpt_<n>.ckpt` files of a run directory, oldest (smallest n) first."""
    found = []
    for path in Path(run_dir).glob("hpc_ckpt_*.ckpt"):
        match = INTERRUPTED_PATTERN.fullmatch(path.name)
        if match:
            found.append((int(match.group(1)), path))
    return [path for _, path in sorted(found)]


def next_interrupted_checkpoint(run_dir: str | Path) -> Path:
    """Where the next signal checkpoint of a run goes (numbered on, as Lightning does)."""
    existing = interrupted_checkpoints(run_dir)
    number = int(INTERRUPTED_PATTERN.fullmatch(existing[-1].name).group(1)) + 1 if existing else 1
    return Path(run_dir) / f"hpc_ckpt_{number}.ckpt"


def newest_state(run_dir: str | Path) -> Path | None:
    """The newest of a run directory's `checkpoints/last.ckpt` and `hpc_ckpt_<n>.ckpt`, or None."""
    run_dir = Path(run_dir)
    candidates = [run_dir / "checkpoints" / "last.ckpt", *interrupted_checkpoints(run_dir)[-1:]]
    candidates = [p for p in candidates if p.is_file()]
    return max(candidates, key=lambda p: p.stat().st_mtime) if candidates else None


def newest_last_checkpoint(runs_dir: str | Path, exclude: str | Path | None = None) -> Path:
    """The most recent training state among the run directories in `runs_dir`.

    A run's state is its `checkpoints/last.ckpt`, or the `hpc_ckpt_<n>.ckpt` it saved when a
    signal stopped it, whichever is newer.
    """
    runs_dir = Path(runs_dir)
    exclude = Path(exclude).resolve() if exclude else None
    candidates = [
        state
        for run in runs_dir.glob("*/")
        if exclude is None or run.resolve() != exclude
        if (state := newest_state(run)) is not None
    ]
    if not candidates:
        raise CheckpointError(
            f"resume=true found no checkpoints/last.ckpt under {runs_dir}; "
            "pass resume=PATH/TO/last.ckpt to name one"
        )
    return max(candidates, key=lambda p: p.stat().st_mtime)
