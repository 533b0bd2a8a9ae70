"""Exponential moving averages of a codec's weights: the weights a recipe validates, saves and
codes with, while the optimiser trains another copy."""

from __future__ import annotations

import torch
from torch import nn


@torch.no_grad()
def ema_update(ema: nn.Module, online: nn.Module, decay: float) -> None:
    """ema <- decay · ema + (1 - decay) · online, parameter by parameter; buffers are copied."""
    torch._foreach_lerp_(
        list(ema.parameters()), [p.detach() for p in online.parameters()], 1 - decay
    )
    for mine, theirs in zip(ema.buffers(), online.buffers()):
        mine.copy_(theirs)
