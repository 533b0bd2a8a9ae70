"""McQuic's training augmentations and patch erasing, and how its recipe applies them."""

from __future__ import annotations

import math

import pytest
import torch

from src.codecs.mcquic import McQuic
from src.datamodules.augment import (
    PLANCKIAN_RGB,
    Augment,
    PatchErasing,
    planckian_jitter,
    random_flip,
    random_gamma,
)
from src.errors import ConfigError
from src.lightning_modules.mcquic import CodeUsage, McQuicRecipe
from src.optim.lamb import Lamb


def test_patch_erasing_blanks_three_quarters_of_the_grid_alike_for_the_batch():
    torch.manual_seed(0)
    x = torch.rand(3, 3, 64, 48)
    erased = PatchErasing(grid=16, share=0.75)(x)
    blank = erased == 0.5
    assert torch.equal(blank[0], blank[2])  # one pattern per batch
    cells = blank[0, 0].reshape(16, 4, 16, 3).permute(0, 2, 1, 3).reshape(256, -1)
    assert cells.all(1).sum() == 192 and (cells.all(1) | ~cells.any(1)).all()  # whole patches
    assert torch.equal(erased[~blank], x[~blank])
    assert not torch.equal(PatchErasing()(x) == 0.5, blank)  # a fresh pattern every call
    with pytest.raises(ConfigError):
        PatchErasing(share=1.5)


def test_random_gamma_picks_one_of_the_four_official_curves_per_image():
    torch.manual_seed(0)
    x = torch.rand(40, 3, 4, 4)
    out = random_gamma(x)
    encode = torch.where(x < 0.0031308, 12.92 * x, 1.055 * x.pow(1 / 2.4) - 0.055)
    decode = torch.where(x < 0.04045, x / 12.92, ((x + 0.055) / 1.055).pow(2.4))
    seen = set()
    for i in range(40):
        if torch.allclose(out[i], x[i]):
            seen.add("none")
        elif torch.allclose(out[i], encode[i].clamp(0, 1)):
            seen.add("encode")
        elif torch.allclose(out[i], decode[i]):
            seen.add("decode")
        else:
            gamma = math.log(out[i, 0, 0, 0]) / math.log(x[i, 0, 0, 0])
            assert 0.05 <= gamma <= 2 and torch.allclose(out[i], x[i].pow(gamma), atol=1e-5)
            seen.add("power")
    assert seen == {"none", "encode", "decode", "power"}


def test_planckian_jitter_and_flips():
    torch.manual_seed(0)
    x = torch.rand(6, 3, 5, 7) * 0.5
    jittered = planckian_jitter(x, 1.0)
    assert torch.equal(jittered[:, 1], x[:, 1])
    ratios = {(round(r / g, 3), round(b / g, 3)) for r, g, b in PLANCKIAN_RGB}
    for i in range(6):
        r, b = ((jittered[i, c] / x[i, c]).mean().item() for c in (0, 2))
        assert (round(r, 3), round(b, 3)) in ratios
    assert torch.equal(planckian_jitter(x, 0.0), x)
    assert torch.equal(random_flip(x, 1.0, -2), x.flip(-2))
    assert torch.equal(random_flip(x, 0.0, -1), x)
    assert torch.equal(Augment(gamma=False, hflip=0, vflip=1)(x), x.flip(-2))
    with pytest.raises(ConfigError, match="planckian"):
        Augment(planckian=2)


def test_recipe_erases_the_input_for_the_first_epochs_and_scores_the_clean_image(monkeypatch):
    recipe = McQuicRecipe(
        McQuic(m=2, N=4, codebook_sizes=[8]),
        optimizer=lambda params: Lamb(params),
        augment=Augment(gamma=False, hflip=0, vflip=1),
        erasing=PatchErasing(),
        erase_epochs=2,
    )
    x = torch.rand(2, 3, 32, 32)
    inputs, target = recipe.training_pair(x)
    assert torch.equal(target, x.flip(-2)) and (inputs == 0.5).float().mean() == 0.75
    monkeypatch.setattr(McQuicRecipe, "current_epoch", property(lambda self: 2))
    inputs, target = recipe.training_pair(x)
    assert torch.equal(inputs, target) and torch.equal(target, x.flip(-2))


def test_code_usage_and_ideal_bpp():
    usage = CodeUsage(McQuic(m=2, N=4, codebook_sizes=[4, 2]))
    fine = torch.tensor([[0, 0, 1, 1], [2, 2, 2, 2]]).reshape(1, 2, 2, 2)
    coarse = torch.tensor([[0], [1]]).reshape(1, 2, 1, 1)
    usage.update([fine, coarse], pixels=64)
    counts, bpp = usage.compute()
    assert counts[0].tolist() == [[2, 2, 0, 0], [0, 0, 4, 0]]
    assert ((counts[0] > 0).float().mean(), (counts[1] > 0).float().mean()) == (0.375, 0.5)
    assert bpp == pytest.approx(4 * 1.0 / 64)  # one bit each for the first sub-codebook's codes
