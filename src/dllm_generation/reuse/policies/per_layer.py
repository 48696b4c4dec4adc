"""`per_layer`: target layer j computes at steps 0, layer_k[j], 2*layer_k[j], ... of each sub-block.

A depth-aware schedule (say, early layers refreshed more often than late ones); every period 1 is
no reuse, every period k the fixed policy.
"""

from __future__ import annotations

from .base import StepCountPolicy
from .registry import register_policy


@register_policy
class PerLayerPolicy(StepCountPolicy):
    name = "per_layer"
    fields = ("layer_k",)
    summary = "recomputes each layer every layer_k[j] steps"
    instead_of_k = "give one period per target layer in layer_k"

    @classmethod
    def check(cls, config) -> None:
        periods = config.layer_k
        if (not isinstance(periods, (list, tuple)) or not periods
                or any(isinstance(v, bool) or not isinstance(v, int) or v < 1 for v in periods)):
            raise ValueError(f"LayerReuseConfig.layer_k={periods!r} is invalid (allowed with "
                             "policy='per_layer': a non-empty list of integers >= 1, one per target layer)")
        config.layer_k = list(periods)

    @classmethod
    def check_targets(cls, config, layers: tuple[int, ...]) -> None:
        if len(config.layer_k) != len(layers):
            raise ValueError(f"LayerReuseConfig.layer_k has {len(config.layer_k)} periods but the reuse targets "
                             f"{len(layers)} layers {list(layers)} (allowed: exactly one period per target layer)")

    @classmethod
    def never_recalls(cls, config) -> bool:
        return all(period == 1 for period in config.layer_k)

    @classmethod
    def label_parts(cls, config) -> list[str]:
        return ["ks" + ".".join(map(str, config.layer_k or []))]

    def layer_periods(self) -> tuple[int, ...]:
        return tuple(self.config.layer_k)
