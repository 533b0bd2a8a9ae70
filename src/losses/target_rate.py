"""HiFIC's target-rate penalty: a rate weight that switches on whether a batch is over its target.

λ' = λ_a when the batch's quantised bpp is above the target r_t, else λ_b; the loss carries
λ'·bpp (the noisy, differentiable estimate). During the first `warmup_steps` the target is relaxed
(× 0.20/0.14) and the weights are rescaled by `warmup_weight_factor`. The two published codes
disagree on that rescaling and on λ_b, so `semantics` picks one:

- "official" (tensorflow/compression's HiFiC): the weights *divide* by the factor during the
  warm-up (the schedule multiplies a λ that sits in a denominator), and λ_b = 2⁻⁶;
- "port" (Justin-Tan's PyTorch port): the weights are *multiplied* by it, and λ_b = 2⁻⁴.
"""

from __future__ import annotations

from dataclasses import dataclass

from src.errors import ConfigError

SEMANTICS = ("official", "port")
DEFAULT_WEIGHT_UNDER = {"official": 2.0**-6, "port": 2.0**-4}


@dataclass(frozen=True)
class TargetRate:
    """The rate weight of a batch as a function of its quantised bpp and the training step.

    Args:
        target: r_t in bits per pixel.
        weight_over: λ_a, the rate weight above the target.
        weight_under: λ_b, below it; None takes the semantics' own value.
        semantics: "official" or "port" (see the module docstring).
        warmup_steps: steps with the relaxed target and rescaled weights (0: none).
        warmup_target_factor: target multiplier during the warm-up (0.20 / 0.14).
        warmup_weight_factor: weight rescaling during the warm-up (2).
    """

    target: float
    weight_over: float
    weight_under: float | None = None
    semantics: str = "official"
    warmup_steps: int = 50_000
    warmup_target_factor: float = 0.20 / 0.14
    warmup_weight_factor: float = 2.0

    def __post_init__(self) -> None:
        if self.semantics not in SEMANTICS:
            raise ConfigError(
                f"model.rate_penalty must be one of {SEMANTICS}, got {self.semantics!r}"
            )
        if self.target <= 0:
            raise ConfigError(f"model.target_rate must be positive, got {self.target}")
        under = self.resolved_under()
        if self.weight_over <= 0 or under <= 0:
            raise ConfigError(
                f"rate weights must be positive (model.lmbda={self.weight_over}, "
                f"model.lmbda_under={under})"
            )

    def resolved_under(self) -> float:
        """λ_b as configured, or the semantics' default."""
        if self.weight_under is None:
            return DEFAULT_WEIGHT_UNDER[self.semantics]
        return float(self.weight_under)

    def target_at(self, step: int) -> float:
        """r_t at `step`, relaxed during the warm-up."""
        return self.target * (self.warmup_target_factor if step < self.warmup_steps else 1.0)

    def weight(self, quantized_bpp: float, step: int) -> float:
        """λ' for a batch whose rounded latents cost `quantized_bpp`, at training step `step`."""
        weight = self.weight_over if quantized_bpp > self.target_at(step) else self.resolved_under()
        if step < self.warmup_steps:
            factor = self.warmup_weight_factor
            weight = weight / factor if self.semantics == "official" else weight * factor
        return weight
