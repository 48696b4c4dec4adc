"""When a layer-reuse step computes each target layer and when it recalls it, per row.

Every policy restarts at each sub-block, and step 0 of a sub-block always computes (nothing is
stored for it yet). The decision uses only what the decoder already reads to the host each step (how
many slots of the row's sub-block are still masked), so no policy adds a device-to-host read, and
every engine executes its decisions unchanged.

* `fixed`: compute at steps 0, k, 2k, ...
* `unmask_drift`: a stored entry goes stale as tokens are unmasked (a masked slot's input changes
  from the mask embedding to a token, and every other position's features follow). Recall while the
  share of the sub-block unmasked since the entry was stored is at most `tolerance` and the entry is
  younger than `max_staleness` steps; compute otherwise. Tolerance 0 never recalls (each step
  unmasks at least one token), so it equals no reuse; tolerance 1 with `max_staleness=k` equals the
  fixed policy with period k.
* `per_layer`: target layer j computes at steps 0, layer_k[j], 2*layer_k[j], ... A depth-aware
  schedule (say, early layers refreshed more often than late ones) at the cost of a host-side rule.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class RowReuseState:
    """One row's place in its sub-block's reuse schedule."""

    step: int = 0  # denoising steps taken in the current sub-block
    stored_at: int = 0  # the step whose forward stored the entry
    masked_at_store: int = 0  # masked slots of the sub-block when the entry was stored


class ReuseSchedule:
    """Decides compute (True) or recall (False) for a row's next step; see the module docstring."""

    def __init__(self, config, small_block_size: int, num_targets: int):
        self.config = config
        self.small_block_size = small_block_size
        self.all_compute = (True,) * num_targets
        self.all_recall = (False,) * num_targets

    def computes(self, row: RowReuseState, masked_now: int) -> tuple[bool, ...]:
        """Per target layer (in layer order): compute (True) or recall (False) at the row's next step."""
        config = self.config
        if row.step == 0:
            return self.all_compute
        if config.policy == "per_layer":
            return tuple(row.step % k == 0 for k in config.layer_k)
        if config.policy == "fixed":
            return self.all_compute if row.step % config.k == 0 else self.all_recall
        age = row.step - row.stored_at
        unmasked_share = (row.masked_at_store - masked_now) / self.small_block_size
        stale = config.max_staleness is not None and age >= config.max_staleness
        return self.all_compute if stale or unmasked_share > config.tolerance else self.all_recall

    @staticmethod
    def record(row: RowReuseState, computed: tuple[bool, ...], masked_now: int) -> None:
        """After the step's plan is final (an uncovered recall may have been turned into a compute).
        The drift policy's entry age counts from the last step that computed every target layer."""
        if all(computed):
            row.stored_at, row.masked_at_store = row.step, masked_now
        row.step += 1
