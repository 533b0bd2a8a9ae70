"""QVRF as the paper starts it: stage 1's λ, the anchor index, stage 2 from a fixed-rate model at
paper size (shapes only, nothing trains), and the paper preset."""

from __future__ import annotations

import logging
import math

import hydra
import pytest
import torch

from src.codecs.compressai_zoo import CompressAICodec
from src.codecs.importing import codec_checkpoint
from src.codecs.qvrf import QvrfCodec
from src.coding.container import Rate
from src.errors import CheckpointError, ConfigError
from src.lightning_modules.qvrf import resolve_stage1_lmbda

pytestmark = pytest.mark.usefixtures("one_thread")
SET = (0.0018, 0.0035, 0.0067, 0.0130, 0.025, 0.0483, 0.0932, 0.18)


def recipe(compose_train, *overrides: str, tiny: bool = True):
    return hydra.utils.instantiate(compose_train("model=qvrf", *overrides, tiny=tiny).model)


def test_stage_1_lmbda_anchor_official_or_a_number(compose_train):
    assert recipe(compose_train).rd_loss.lmbda == 0.0018
    official = recipe(compose_train, "model.stage1_lmbda=official")
    official.use_rate(official.trained_indices()[0])
    assert official.rd_loss.lmbda == 0.18 and official.codec.current_gain().item() == 1.0
    assert recipe(compose_train, "model.stage1_lmbda=0.05").rd_loss.lmbda == 0.05
    assert resolve_stage1_lmbda("official", (0.1, 0.2, 1.44), 0) == 1.44
    for bad in ("best", -1, 0):
        with pytest.raises(ConfigError, match="model.stage1_lmbda"):
            resolve_stage1_lmbda(bad, SET, 0)
    with pytest.raises(Exception, match="stage1_lmbda") as err:
        recipe(compose_train, "model.lmbda=0.01")
    assert isinstance(err.value.__cause__ or err.value, ConfigError)


def test_the_anchor_index_has_gain_1_and_sets_the_others(compose_train):
    module = recipe(compose_train, "model.anchor=5")
    codec = module.codec
    assert codec.anchor == 5 and module.trained_indices() == [5]
    assert codec.gain.tolist() == pytest.approx([math.sqrt(v / 0.0483) for v in SET])
    assert codec.gain[5].item() == 1.0 and module.rd_loss.lmbda == 0.0483
    codec = recipe(compose_train, "stage=2", "model.anchor=5").codec
    for index in (5, 4):
        codec.set_rate(Rate.index(index))
        codec.current_gain().backward()
    assert codec.gain.grad[5] == 0 and codec.gain.grad[4] == 1  # the anchor is fixed in training
    low, high = codec.factor_range
    assert low == pytest.approx(0.5 * math.sqrt(0.0018 / 0.0483))
    assert high == pytest.approx(1.2 * math.sqrt(0.18 / 0.0483))
    with pytest.raises(ConfigError, match="model.anchor"):
        QvrfCodec("mbt2018_mean", N=8, M=8, anchor=8)


def save_checkpoint(path, module) -> None:
    """What a fixed-rate training run writes, minus the optimiser."""
    torch.save(
        {
            "state_dict": module.state_dict(),
            "hyper_parameters": {"lmbda": module.hparams.lmbda},
            "codec_name": module.codec.name,
            "codec_config": module.codec.config(),
        },
        path,
    )


def test_stage_2_from_the_readme_fixed_rate_anchor_at_paper_size(compose_train, tmp_path, caplog):
    """The README's fixed-rate command builds the anchor QVRF's paper size needs: N = 192 at
    λ = 0.0018; the plain quality-3 preset (N = 128) is refused with the settings to use."""
    fixed = hydra.utils.instantiate(
        compose_train(
            "model=cheng2020_attn", "model.quality=1", "model.codec.N=192", tiny=False
        ).model
    )
    assert fixed.hparams.lmbda == 0.0018
    save_checkpoint(tmp_path / "anchor.ckpt", fixed)
    qvrf = recipe(compose_train, "stage=2", tiny=False)
    with caplog.at_level(logging.WARNING):
        qvrf.init_weights_from(tmp_path / "anchor.ckpt")
    assert "was trained at" not in caplog.text
    assert torch.equal(qvrf.codec.net.g_a[0].conv1.weight, fixed.codec.net.g_a[0].conv1.weight)
    assert qvrf.codec.gain.tolist() == pytest.approx([math.sqrt(v / 0.0018) for v in SET])

    default = hydra.utils.instantiate(compose_train("model=cheng2020_attn", tiny=False).model)
    save_checkpoint(tmp_path / "q3.ckpt", default)
    with pytest.raises(CheckpointError, match="model.quality=1 model.codec.N=192"):
        qvrf.init_weights_from(tmp_path / "q3.ckpt")


def test_stage_2_from_an_imported_zoo_model_pairs_its_lmbda_with_gain_1(
    compose_train, tmp_path, caplog
):
    """CompressAI's cheng2020_attn quality 6 (λ = 0.0483; its widths are QVRF's quality 6, here
    shrunk to N = 8 on both sides): model.anchor=5 gives it gain 1; the authors' anchor 0 is
    reported with the index that would."""
    zoo = CompressAICodec("cheng2020-attn", 6, N=8)
    provenance = {"format": "compressai", "quality": 6, "metric": "mse"}
    torch.save(codec_checkpoint(zoo, provenance), tmp_path / "zoo.ckpt")
    with caplog.at_level(logging.WARNING):
        recipe(compose_train, "stage=2", "model.anchor=5").init_weights_from(tmp_path / "zoo.ckpt")
    assert "was trained at" not in caplog.text
    with caplog.at_level(logging.WARNING):
        recipe(compose_train, "stage=2").init_weights_from(tmp_path / "zoo.ckpt")
    assert "λ=0.0483" in caplog.text and "model.anchor=5" in caplog.text


def test_the_paper_preset_has_each_stages_length_and_the_authors_settings(compose_train):
    for stage, epochs in ((1, 2000), (2, 500), (3, 500)):
        cfg = compose_train("experiment=qvrf_paper", f"stage={stage}", tiny=False)
        assert (cfg.trainer.max_epochs, cfg.trainer.max_steps) == (epochs, -1)
        assert cfg.run_name == f"qvrf_paper_stage{stage}"
    assert compose_train("experiment=qvrf_paper", tiny=False).trainer.max_epochs == 2000
    assert (cfg.data.crop, cfg.data.batch_size, cfg.seed, cfg.trainer.devices) == (256, 8, 1926, 1)
    assert cfg.model.scheduler.patience == 20 and cfg.model.optimizer.lr == 1e-4
    assert resolve_stage1_lmbda(cfg.model.stage1_lmbda, SET, cfg.model.anchor) == 0.18
    cfg = compose_train("experiment=qvrf_paper", "stage=4", tiny=False)
    with pytest.raises(Exception, match="stage=4: this preset has stages 1..3"):
        cfg.trainer.max_epochs  # noqa: B018 (resolving it is the test)
