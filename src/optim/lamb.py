"""LAMB (You et al., "Large Batch Optimization for Deep Learning", ICLR 2020), in plain PyTorch.

McQuic trains with NVIDIA Apex's FusedLAMB; this is the same update without Apex, with Apex's
defaults (betas 0.9/0.999, eps 1e-6 added to √v̂, weight decay 0.01 decoupled and added to the
update, bias correction on). Per parameter tensor:

    m ← β1·m + (1 − β1)·g          v ← β2·v + (1 − β2)·g²
    u = m̂ / (√v̂ + eps) + wd·w      r = ‖w‖ / ‖u‖  (1 when either norm is 0)
    w ← w − lr · r · u

Like Apex (`use_nvlamb=False`), the trust ratio r is applied only where weight decay is non-zero,
unless `always_adapt=True` (Apex's `use_nvlamb=True`). Gradient clipping is the recipe's job.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import Tensor
from torch.optim import Optimizer


class Lamb(Optimizer):
    """Layer-wise adaptive moments (see the module docstring for the exact update)."""

    def __init__(
        self,
        params: Iterable[Tensor] | Iterable[dict[str, Any]],
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-6,
        weight_decay: float = 0.01,
        bias_correction: bool = True,
        always_adapt: bool = False,
    ) -> None:
        if lr < 0 or eps < 0 or weight_decay < 0:
            raise ValueError(
                f"lr, eps and weight_decay must be ≥ 0 (got {lr}, {eps}, {weight_decay})"
            )
        if not all(0 <= b < 1 for b in betas):
            raise ValueError(f"betas must be in [0, 1), got {betas}")
        defaults = dict(
            lr=lr,
            betas=tuple(betas),
            eps=eps,
            weight_decay=weight_decay,
            bias_correction=bias_correction,
            always_adapt=always_adapt,
        )
        super().__init__(params, defaults)

    @torch.no_grad()
    def step(self, closure: Callable[[], Tensor] | None = None) -> Tensor | None:
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            beta1, beta2 = group["betas"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                if p.grad.is_sparse:
                    raise RuntimeError("Lamb does not support sparse gradients")
                state = self.state[p]
                if not state:
                    state["step"] = 0
                    state["exp_avg"] = torch.zeros_like(p)
                    state["exp_avg_sq"] = torch.zeros_like(p)
                state["step"] += 1
                exp_avg, exp_avg_sq = state["exp_avg"], state["exp_avg_sq"]
                exp_avg.mul_(beta1).add_(p.grad, alpha=1 - beta1)
                exp_avg_sq.mul_(beta2).addcmul_(p.grad, p.grad, value=1 - beta2)
                m_hat, v_hat = exp_avg, exp_avg_sq
                if group["bias_correction"]:
                    m_hat = exp_avg / (1 - beta1 ** state["step"])
                    v_hat = exp_avg_sq / (1 - beta2 ** state["step"])
                update = m_hat / (v_hat.sqrt() + group["eps"])
                if group["weight_decay"] != 0:
                    update = update.add(p, alpha=group["weight_decay"])
                ratio = 1.0
                if group["weight_decay"] != 0 or group["always_adapt"]:
                    w_norm, u_norm = p.norm(), update.norm()
                    if w_norm > 0 and u_norm > 0:
                        ratio = float(w_norm / u_norm)
                p.add_(update, alpha=-group["lr"] * ratio)
        return loss
