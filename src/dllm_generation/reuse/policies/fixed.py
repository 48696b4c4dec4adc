"""`fixed` (the default): every target layer computes at steps 0, k, 2k, ... of each sub-block."""

from __future__ import annotations

from .base import StepCountPolicy
from .registry import register_policy


@register_policy
class FixedPolicy(StepCountPolicy):
    name = "fixed"
    uses_k = True
    summary = "recomputes every k steps"

    @classmethod
    def never_recalls(cls, config) -> bool:
        return config.k == 1

    @classmethod
    def label_parts(cls, config) -> list[str]:
        return [f"k{config.k}"]

    def layer_periods(self) -> tuple[int, ...]:
        return (self.config.k,) * self.num_targets
