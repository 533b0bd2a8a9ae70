"""QVRF's three-stage recipe on top of the generic rate-distortion one.

- stage 1: a fixed-rate model at `stage1_lmbda` with the anchor gain a = 1 and noise
  quantisation; the gains do not train. "anchor" is the anchor's own λ; "official" is what the
  authors' train.py does: the set's largest λ (0.18) at a = 1.
- stage 2: each batch draws a rate index s uniformly and trains on λ_s with a = gain[s]
  (the anchor, index 0 unless `codec.anchor` says otherwise, stays at 1); the gains train with
  the network, noise quantisation.
- stage 3: as stage 2 with straight-through rounding for the decoder (rate still noise-based).

Every network weight trains in every stage (the QVRF code freezes nothing); the stages differ in
λ, in the quantiser and in whether the gains train. `ckpt=` carries the weights from stage to
stage, and stage 2 may also start from a fixed-rate checkpoint of the same backbone.
Validation runs every trained rate in stages 2–3: `val/loss` is the mean over rates of each
rate's own loss (QVRF's plateau scheduler watches their sum), and `val/bpp_<s>`, `val/psnr_<s>`
follow each rate.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor
from torchmetrics import MeanMetric

from src.codecs.base import Codec
from src.codecs.qvrf import QvrfCodec, resolve_lmbda_set
from src.coding.container import Rate
from src.errors import CheckpointError, ConfigError
from src.evaluation.metrics import psnr
from src.lightning_modules.rate_distortion import OptimizerFactory, RateDistortion
from src.losses.rate_distortion import lmbda_for
from src.utils.checkpoints import load_checkpoint_weights, load_state_checked, read_checkpoint
from src.utils.image_logging import log_reconstructions

log = logging.getLogger(__name__)

STAGES = (1, 2, 3)
STAGE1_LMBDAS = ("anchor", "official")


def resolve_stage1_lmbda(spec: str | float, lmbdas: Sequence[float], anchor: int) -> float:
    """Stage 1's λ: "anchor" (λ of the anchor index), "official" (the set's largest λ at gain 1,
    as the authors' train.py trains stage 1: 0.18 for the default set) or a positive number."""
    if spec == "anchor":
        return float(lmbdas[anchor])
    if spec == "official":
        return float(lmbdas[-1])
    try:
        value = float(spec)
    except (TypeError, ValueError):
        value = float("nan")
    if not value > 0:
        raise ConfigError(
            f"model.stage1_lmbda must be one of {STAGE1_LMBDAS} or a positive λ, got {spec!r}"
        )
    return value


def fixed_rate_lmbda(checkpoint: dict) -> float | None:
    """The λ a fixed-rate checkpoint was trained at, where it says: a training run's hyper-
    parameters, or the quality of an imported CompressAI zoo file."""
    hparams = checkpoint.get("hyper_parameters") or {}
    if hparams.get("lmbda") is not None:
        return float(hparams["lmbda"])
    imported = checkpoint.get("imported_from") or {}
    if imported.get("format") == "compressai" and imported.get("quality") is not None:
        return lmbda_for(imported.get("metric") or "mse", int(imported["quality"]))
    return None


class Qvrf(RateDistortion):
    """Train one QVRF codec for every rate of its λ set, in three stages.

    Args:
        codec: a `QvrfCodec`.
        optimizer: partial of the main optimiser (it also trains the gains).
        stage: 1, 2 or 3 (None: 1).
        stage1_lmbda: stage 1's λ, trained at the anchor's gain 1: "anchor", "official" or a
            number (`resolve_stage1_lmbda`); stages 2–3 take λ from the set.
        lmbda: not used (QVRF's λ come from `stage1_lmbda` and the λ set); refused if given.
        backbone, lmbda_set, anchor: the user's choices, which the preset hands on to the codec;
            checked against it so a model built by hand cannot disagree with its recipe.
        **kwargs: the generic recipe's arguments (metric, schedulers, clipping, ...).
    """

    def __init__(
        self,
        codec: Codec,
        optimizer: OptimizerFactory,
        stage: int | None = 1,
        stage1_lmbda: str | float = "anchor",
        lmbda: float | None = None,
        backbone: str | None = None,
        lmbda_set: str | Sequence[float] | None = None,
        anchor: int | None = None,
        **kwargs: Any,
    ) -> None:
        stage = 1 if stage is None else stage
        if stage not in STAGES:
            raise ConfigError(f"stage must be one of {STAGES} for QVRF, got {stage!r}")
        if not isinstance(codec, QvrfCodec):
            raise ConfigError(
                f"the qvrf recipe trains a QvrfCodec, got {type(codec).__name__} in model.codec"
            )
        if backbone is not None and backbone.replace("_", "-") != codec.arch:
            raise ConfigError(f"model.backbone is {backbone} but model.codec.arch is {codec.arch}")
        if anchor is not None and anchor != codec.anchor:
            raise ConfigError(f"model.anchor is {anchor} but model.codec.anchor is {codec.anchor}")
        if lmbda_set is not None:
            lmbda_set = lmbda_set if isinstance(lmbda_set, str) else [float(v) for v in lmbda_set]
            if resolve_lmbda_set(lmbda_set) != codec.lmbdas:
                raise ConfigError(
                    f"model.lmbda_set {lmbda_set} differs from the codec's λ {list(codec.lmbdas)}"
                )
            if isinstance(lmbda_set, str) and kwargs.get("metric", "mse") != "mse":
                raise ConfigError(
                    f"model.lmbda_set={lmbda_set} holds MSE λ; with model.metric="
                    f"{kwargs['metric']} give the λ list yourself"
                )
        if lmbda is not None:
            raise ConfigError(
                f"model.lmbda={lmbda} is not used by QVRF: stage 1 trains at model.stage1_lmbda "
                f"({' | '.join(STAGE1_LMBDAS)} | a number), stages 2-3 at model.lmbda_set"
            )
        self.stage1_lmbda = resolve_stage1_lmbda(stage1_lmbda, codec.lmbdas, codec.anchor)
        super().__init__(codec, self.stage1_lmbda, optimizer, **kwargs)
        self.stage = stage
        codec.gain.requires_grad_(stage > 1)
        codec.set_quantizer("ste" if stage == 3 else "noise")
        self.rate_metrics = torch.nn.ModuleDict(
            {
                f"{name}_{index}": MeanMetric()
                for index in self.trained_indices()
                for name in ("bpp", "psnr")
            }
            if stage > 1
            else {}
        )

    # ---- rates --------------------------------------------------------------------------------
    def trained_indices(self) -> list[int]:
        """The rate indices this stage trains and validates."""
        return [self.codec.anchor] if self.stage == 1 else list(range(self.codec.num_rates))

    def use_rate(self, index: int) -> None:
        """Set the codec's gain and the loss's λ for rate `index`."""
        self.codec.set_rate(Rate.index(index))
        self.rd_loss.lmbda = self.stage1_lmbda if self.stage == 1 else self.codec.lmbdas[index]

    # ---- training -----------------------------------------------------------------------------
    def training_step(self, batch: Tensor, batch_idx: int) -> Tensor:
        indices = self.trained_indices()
        self.use_rate(indices[int(torch.randint(len(indices), ()))])
        return super().training_step(batch, batch_idx)

    # ---- validation ---------------------------------------------------------------------------
    def validation_step(self, batch: Tensor, batch_idx: int) -> None:
        pixels = batch.shape[-2] * batch.shape[-1]
        for index in self.trained_indices():
            self.use_rate(index)
            out, x_hat = self.validate_batch(batch)
            if self.stage > 1:
                self.rate_metrics[f"bpp_{index}"].update(out.total_bits() / pixels)
                self.rate_metrics[f"psnr_{index}"].update(psnr(batch, x_hat))
        if batch_idx == 0 and self.hparams.num_logged_images > 0:  # at the highest rate
            k = self.hparams.num_logged_images
            log_reconstructions(self.loggers, batch[:k], x_hat[:k], self.global_step)

    def on_validation_epoch_end(self) -> None:
        super().on_validation_epoch_end()
        for name, metric in self.rate_metrics.items():
            if metric.update_count > 0:
                self.log(f"val/{name}", metric.compute())
            metric.reset()

    # ---- warm starts --------------------------------------------------------------------------
    def init_weights_from(self, path: str | Path) -> None:
        """`ckpt=`: a QVRF checkpoint (an earlier stage), or a fixed-rate checkpoint of the same
        backbone (`model=cheng2020_attn ...`, or an imported zoo file), whose weights fill
        `codec.net` while the gains keep their initial values √(λ_s / λ_anchor). The fixed-rate
        model should have the anchor's λ and the codec's widths; a λ that differs is reported
        (the authors' README warm-starts that way), widths that differ are refused."""
        checkpoint = read_checkpoint(path)
        if checkpoint.get("codec_name") != self.codec.arch:
            load_checkpoint_weights(self, checkpoint, f"checkpoint {path}")
            return
        self._check_fixed_rate_model(checkpoint, path)
        state = dict(checkpoint["state_dict"])
        state["codec.gain"] = self.codec.gain.detach().clone()
        load_state_checked(self, state, f"fixed-rate checkpoint {path}")
        log.info("initialised the %s backbone from the fixed-rate %s", self.codec.arch, path)

    def _check_fixed_rate_model(self, checkpoint: dict, path: str | Path) -> None:
        """Refuse a fixed-rate model of other widths, naming the setting to change; report a λ
        other than the anchor's."""
        state = checkpoint.get("state_dict") or {}
        differ = [
            f"{k} {tuple(state[k].shape)} vs ours {tuple(p.shape)}"
            for k, p in self.named_parameters()
            if k in state and tuple(state[k].shape) != tuple(p.shape)
        ]
        if differ:
            raise CheckpointError(
                f"fixed-rate checkpoint {path} has other widths than this QVRF codec "
                f"({differ[0]}): train it at the codec's widths (QVRF's anchor at paper size: "
                "model=cheng2020_attn model.quality=1 model.codec.N=192), or set this codec's "
                "model.quality / model.codec.N to the fixed-rate model's"
            )
        trained_at = fixed_rate_lmbda(checkpoint)
        anchor_lmbda = self.codec.lmbdas[self.codec.anchor]
        if trained_at is not None and not math.isclose(trained_at, anchor_lmbda):
            matching = [i for i, v in enumerate(self.codec.lmbdas) if math.isclose(v, trained_at)]
            hint = f"; model.anchor={matching[0]} pairs it with gain 1" if matching else ""
            log.warning(
                "fixed-rate %s was trained at λ=%g, but gain 1 belongs to anchor index %d (λ=%g)%s",
                path,
                trained_at,
                self.codec.anchor,
                anchor_lmbda,
                hint,
            )
