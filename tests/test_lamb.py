"""LAMB against a hand computation, and the cosine warm-restart schedule."""

from __future__ import annotations

import math

import pytest
import torch

from src.errors import ConfigError
from src.optim.cosine_restarts import warmup_cosine_restarts
from src.optim.lamb import Lamb


def test_lamb_two_steps_match_a_hand_computation():
    w = torch.nn.Parameter(torch.tensor([3.0, -4.0]))
    opt = Lamb([w], lr=0.1, betas=(0.5, 0.75), eps=0.0, weight_decay=0.5)
    # Step 1, g = (1, 2): m̂ = g, v̂ = g², so m̂/√v̂ = (1, 1); u = (1, 1) + 0.5·(3, −4) = (2.5, −1).
    # ‖w‖ = 5, ‖u‖ = √7.25, w ← w − 0.1 · 5/√7.25 · u.
    w.grad = torch.tensor([1.0, 2.0])
    opt.step()
    ratio = 5 / math.sqrt(7.25)
    w1 = torch.tensor([3 - 0.1 * ratio * 2.5, -4 + 0.1 * ratio * 1.0])
    assert torch.allclose(w.detach(), w1, atol=1e-6)
    # Step 2, g = (−1, 2): m = .5·(.5, 1) + .5·(−1, 2) = (−.25, 1.5),
    # v = .75·(.25, 1) + .25·(1, 4) = (.4375, 1.75); bias corrections 1 − .5² = .75 and
    # 1 − .75² = .4375: m̂ = (−1/3, 2), v̂ = (1, 4), so m̂/√v̂ = (−1/3, 1).
    w.grad = torch.tensor([-1.0, 2.0])
    opt.step()
    u = torch.tensor([-1 / 3, 1.0]) + 0.5 * w1
    w2 = w1 - 0.1 * (w1.norm() / u.norm()) * u
    assert torch.allclose(w.detach(), w2, atol=1e-6)


def test_lamb_without_weight_decay_is_adam_unless_always_adapt():
    torch.manual_seed(0)
    w_lamb = torch.nn.Parameter(torch.randn(5))
    w_adam = torch.nn.Parameter(w_lamb.detach().clone())
    lamb = Lamb([w_lamb], lr=0.01, weight_decay=0.0, eps=1e-8)
    adam = torch.optim.Adam([w_adam], lr=0.01, eps=1e-8)
    for _ in range(3):
        g = torch.randn(5)
        w_lamb.grad, w_adam.grad = g.clone(), g.clone()
        lamb.step()
        adam.step()
    assert torch.allclose(w_lamb, w_adam, atol=1e-6)
    # With the trust ratio on every tensor, one step moves w by exactly lr·‖w‖.
    w = torch.nn.Parameter(torch.tensor([0.6, 0.8]))
    w.grad = torch.tensor([5.0, -1.0])
    Lamb([w], lr=0.1, weight_decay=0.0, always_adapt=True).step()
    assert float((w.detach() - torch.tensor([0.6, 0.8])).norm()) == pytest.approx(0.1, rel=1e-5)


def test_cosine_warm_restarts():
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    sched = warmup_cosine_restarts(opt, cycle_length=10, warmup=2, gamma=0.5, min_scale=0.01)
    lrs = []
    for _ in range(25):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert lrs[0] == pytest.approx(0.01) and lrs[1] == pytest.approx(0.505)
    assert lrs[2] == pytest.approx(1.0)  # peak of cycle 0
    assert lrs[6] == pytest.approx(0.01 + 0.99 * (1 + math.cos(math.pi * 4 / 8)) / 2)
    assert lrs[10] == pytest.approx(0.01) and lrs[12] == pytest.approx(0.5)  # restart, peak ×γ
    assert lrs[22] == pytest.approx(0.25)
    assert all(0.01 - 1e-9 <= lr <= 1.0 for lr in lrs)
    with pytest.raises(ConfigError):
        warmup_cosine_restarts(opt, cycle_length=5, warmup=5)


def test_cosine_restarts_floor_follows_gamma_as_the_official_schedule():
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=2.0)
    sched = warmup_cosine_restarts(opt, 10, warmup=2, gamma=0.25, floor_follows_gamma=True)
    for step in range(35):
        # McQuic's CosineAnnealingWarmupRestarts: both ends of cycle c scale by gamma^c.
        c, pos = divmod(step, 10)
        top, low = 2.0 * 0.25**c, 2.0 * 0.01 * 0.25**c
        if pos < 2:
            expected = low + (top - low) * pos / 2
        else:
            expected = low + (top - low) * (1 + math.cos(math.pi * (pos - 2) / 8)) / 2
        assert opt.param_groups[0]["lr"] == pytest.approx(expected), step
        opt.step()
        sched.step()
