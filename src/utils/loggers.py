"""Logger factories with the framework's defaults."""

from __future__ import annotations

import netrc
import os
from typing import Any

from pytorch_lightning.loggers import WandbLogger


def wandb_account_configured() -> bool:
    """True when wandb can reach an account: an API key in the environment or in ~/.netrc."""
    if os.environ.get("WANDB_API_KEY"):
        return True
    try:
        return netrc.netrc().authenticators("api.wandb.ai") is not None
    except (FileNotFoundError, netrc.NetrcParseError):
        return False


def wandb_logger(offline: bool | None = None, **kwargs: Any) -> WandbLogger:
    """A `WandbLogger` that runs offline unless an account is configured (or `offline` says)."""
    if offline is None:
        offline = not wandb_account_configured()
    return WandbLogger(offline=offline, **kwargs)
