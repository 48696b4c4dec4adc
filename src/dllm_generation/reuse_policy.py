"""When a layer-reuse step computes each target layer and when it recalls it, per row.

Every policy restarts at each sub-block, and step 0 of a sub-block always computes (nothing is
stored for it yet). A policy needs only each row's sub-block and its masked count there, which the
decoder's one device-to-host read per step brings anyway, so the decisions are integer arithmetic
on the host: no policy adds a read or a device operation, and every engine executes the decisions
unchanged.

* `fixed`: compute at steps 0, k, 2k, ...
* `unmask_drift`: a stored entry goes stale as tokens are unmasked (a masked slot's input changes
  from the mask embedding to a token, and every other position's features follow). Recall while the
  share of the sub-block unmasked since the entry was stored is at most `tolerance` and the entry is
  younger than `max_staleness` steps; compute otherwise. Tolerance 0 never recalls (each step
  unmasks at least one token), so it equals no reuse; tolerance 1 with `max_staleness=k` equals the
  fixed policy with period k.
* `per_layer`: target layer j computes at steps 0, layer_k[j], 2*layer_k[j], ... A depth-aware
  schedule (say, early layers refreshed more often than late ones).

`fixed` and `per_layer` decide by the step count alone, so they can also say what the row's next
steps will do (`ahead`): that lets an engine run a sub-block's steps one after another on the
device, with no host round trip between them. `unmask_drift` depends on the tokens and cannot.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

Decision = tuple[bool, ...]  # per target layer, in layer order: compute (True) or recall (False)


@dataclass
class RowSchedule:
    """One row's place in its sub-block's schedule."""

    sub: int = -1  # the sub-block the schedule belongs to (-1: none yet)
    step: int = 0  # denoising steps taken in that sub-block
    stored_at: int = 0  # the step whose forward stored every target layer's entry (unmask_drift)
    masked_at_store: int = 0  # masked slots of the sub-block at that step (unmask_drift)


class ReuseSchedule:
    """Decides, per row and target layer, compute (True) or recall (False) at the next step."""

    def __init__(self, config, small_block_size: int, num_targets: int):
        self.config = config
        self.small_block_size = small_block_size
        self.num_targets = num_targets
        self.periods = tuple(config.layer_k if config.policy == "per_layer" else [config.k] * num_targets)
        self.by_step = config.policy != "unmask_drift"
        # The decisions repeat with this period (steps); None where the tokens decide.
        self.period = math.lcm(*self.periods) if self.by_step else None
        if config.policy == "unmask_drift":
            # share = unmasked / small_block_size > tolerance, as the smallest integer count that
            # exceeds it (no floating point comparison at the boundary).
            self.min_unmasked = next(n for n in range(small_block_size + 2) if n / small_block_size > config.tolerance)

    def at_step(self, step: int) -> Decision:
        """A step-count policy's decisions at `step` of a sub-block (step 0 is a multiple of every period)."""
        return tuple(step % period == 0 for period in self.periods)

    def decide(self, row: RowSchedule, sub: int, masked_now: int) -> Decision:
        """Decisions for a row now in sub-block `sub` with `masked_now` masked slots there; a row
        that entered another sub-block starts its schedule again."""
        if sub != row.sub:
            row.sub, row.step = sub, 0
        if row.step == 0:
            return (True,) * self.num_targets
        if self.by_step:
            return self.at_step(row.step)
        due = row.masked_at_store - masked_now >= self.min_unmasked
        if self.config.max_staleness is not None:
            due = due or row.step - row.stored_at >= self.config.max_staleness
        return (due,) * self.num_targets

    def ahead(self, step: int) -> tuple[Decision, ...] | None:
        """The decisions of step `step` of a sub-block and of the steps after it, one period's worth
        (at most a sub-block's steps), or None where they depend on the tokens. Run i of a chain
        of steps uses entry i % len."""
        if not self.by_step:
            return None
        return tuple(self.at_step(step + i) for i in range(min(self.period, self.small_block_size)))

    @staticmethod
    def record(row: RowSchedule, computed: Decision, masked_now: int, runs: int = 1) -> None:
        """After the row's step ran with the final decisions `computed` (an uncovered recall may
        have become a compute), `runs` times in a chain (only step-count policies chain, and they
        read nothing but the step count). The drift policy's entry age counts from the last step
        that computed every target layer."""
        if all(computed):
            row.stored_at, row.masked_at_store = row.step, masked_now
        row.step += runs
