"""`unmask_drift`: recompute once the share of the sub-block unmasked since the stored entry exceeds
`tolerance`, or the entry is `max_staleness` steps old.

A stored entry goes stale as tokens are unmasked (a masked slot's input changes from the mask
embedding to a token, and every other position's features follow). Tolerance 0 never recalls
(each step unmasks at least one token), so it equals no reuse; tolerance 1 with `max_staleness=k`
equals the fixed policy with period k. The decisions depend on the tokens, so its steps are
planned one by one (never chained on the device).
"""

from __future__ import annotations

from dataclasses import dataclass

from .base import Decision, ReusePolicy, RowState
from .registry import get_policy, register_policy


@dataclass
class DriftRow(RowState):
    stored_at: int = 0  # the step whose forward stored every target layer's entry
    masked_at_store: int = 0  # masked slots of the sub-block at that step


@register_policy
class UnmaskDriftPolicy(ReusePolicy):
    name = "unmask_drift"
    fields = ("tolerance", "max_staleness")
    instead_of_k = "bound the entry's age with max_staleness"

    @classmethod
    def refuse_fields(cls, config) -> str:
        return ("LayerReuseConfig.tolerance and max_staleness apply to policy='unmask_drift' only "
                f"(policy={config.policy!r} {get_policy(config.policy).summary})")

    @classmethod
    def check(cls, config) -> None:
        tolerance, staleness = config.tolerance, config.max_staleness
        if (tolerance is None or isinstance(tolerance, bool) or not isinstance(tolerance, (int, float))
                or not 0.0 <= tolerance <= 1.0):
            raise ValueError(f"LayerReuseConfig.tolerance={tolerance!r} is out of range (allowed with "
                             "policy='unmask_drift': a number in [0, 1], the share of the sub-block)")
        if staleness is not None and (isinstance(staleness, bool) or not isinstance(staleness, int) or staleness < 1):
            raise ValueError(f"LayerReuseConfig.max_staleness={staleness!r} is out of range "
                             "(allowed: None or an integer >= 1)")

    @classmethod
    def never_recalls(cls, config) -> bool:
        # Every step unmasks at least one slot: tolerance 0 is always exceeded, and an entry stored
        # by the step before is always one step old.
        return config.tolerance == 0 or config.max_staleness == 1

    @classmethod
    def label_parts(cls, config) -> list[str]:
        return [f"drift{config.tolerance:g}"] + ([] if config.max_staleness is None else [f"s{config.max_staleness}"])

    def __init__(self, config, small_block_size: int, num_targets: int):
        super().__init__(config, small_block_size, num_targets)
        # share = unmasked / small_block_size > tolerance, as the smallest integer count that
        # exceeds it (no floating point comparison at the boundary).
        self.min_unmasked = next(n for n in range(small_block_size + 2) if n / small_block_size > config.tolerance)

    def new_row(self) -> DriftRow:
        return DriftRow()

    def computes(self, row: DriftRow, masked_now: int) -> Decision:
        due = row.masked_at_store - masked_now >= self.min_unmasked
        if self.config.max_staleness is not None:
            due = due or row.step - row.stored_at >= self.config.max_staleness
        return (due,) * self.num_targets

    def record(self, row: DriftRow, computed: Decision, masked_now: int, runs: int = 1) -> None:
        """The entry's age counts from the last step that computed every target layer."""
        if all(computed):
            row.stored_at, row.masked_at_store = row.step, masked_now
        super().record(row, computed, masked_now, runs)
