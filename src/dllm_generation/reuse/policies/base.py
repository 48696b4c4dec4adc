"""What a reuse policy is: the per-row rule for when a target layer computes and when it recalls.

Every policy restarts at each sub-block, and step 0 of a sub-block always computes (nothing is
stored for it yet). A policy sees only each row's sub-block and its masked count there, which the
decoder's one device-to-host read per step brings anyway, so its decisions are integer arithmetic
on the host: no policy adds a read or a device operation, and every engine executes the decisions
unchanged.

A policy also owns the `LayerReuseConfig` fields only it reads (`fields`): their checks, how a
config using them is named (`label_parts`) and when they mean no reuse at all (`never_recalls`).
Subclass `ReusePolicy` (or `StepCountPolicy` for rules that depend on the step count alone, which
may then be chained on the device) in a new file of this folder and decorate it with
`register_policy`; see docs/layer_reuse.md, "Add a policy".
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

Decision = tuple[bool, ...]  # per target layer, in layer order: compute (True) or recall (False)


@dataclass
class RowState:
    """One row's place in its sub-block's schedule (a policy may extend it, see `new_row`)."""

    sub: int = -1  # the sub-block the schedule belongs to (-1: none yet)
    step: int = 0  # denoising steps taken in that sub-block


class ReusePolicy:
    """A reuse rule, built once per decode for a sub-block size and a number of target layers."""

    name: ClassVar[str] = ""
    # LayerReuseConfig fields only this policy reads; set with another policy they are refused.
    fields: ClassVar[tuple[str, ...]] = ()
    # Whether the config's `k` means something to this policy (else it must stay 1).
    uses_k: ClassVar[bool] = False
    # How the policy decides, as error messages about its config say it ("recomputes every k steps").
    summary: ClassVar[str] = ""
    # For a policy that leaves k=1: what to set instead (said when k is given anyway).
    instead_of_k: ClassVar[str] = ""
    # The decisions repeat with this period (steps); None where the tokens decide.
    period: int | None = None

    def __init__(self, config, small_block_size: int, num_targets: int):
        self.config = config
        self.small_block_size = small_block_size
        self.num_targets = num_targets

    # -- the config -------------------------------------------------------------------------------
    @classmethod
    def check(cls, config) -> None:
        """Raise ValueError naming the field unless this policy's own fields are valid (may normalise them)."""

    @classmethod
    def check_targets(cls, config, layers: tuple[int, ...]) -> None:
        """Raise ValueError unless the config fits these resolved target layers."""

    @classmethod
    def refuse_fields(cls, config) -> str:
        """The message when another policy's config sets this policy's `fields`."""
        names = " and ".join(cls.fields)
        verb = "applies" if len(cls.fields) == 1 else "apply"
        return f"LayerReuseConfig.{names} {verb} to policy={cls.name!r} only (got policy={config.policy!r})"

    @classmethod
    def never_recalls(cls, config) -> bool:
        """Does every step compute every target layer (so the config decodes exactly as no reuse)?"""
        return False

    @classmethod
    def label_parts(cls, config) -> list[str]:
        """How the schedule appears in names (`k2`, `ks2.3`, `drift0.5`, `s4`), before the layers and mode."""
        return [cls.name]

    # -- deciding ----------------------------------------------------------------------------------
    def new_row(self) -> RowState:
        return RowState()

    def decide(self, row: RowState, sub: int, masked_now: int) -> Decision:
        """Decisions for a row now in sub-block `sub` with `masked_now` masked slots there; a row
        that entered another sub-block starts its schedule again."""
        if sub != row.sub:
            row.sub, row.step = sub, 0
        if row.step == 0:
            return (True,) * self.num_targets
        return self.computes(row, masked_now)

    def computes(self, row: RowState, masked_now: int) -> Decision:
        """The rule itself, for steps after a sub-block's first."""
        raise NotImplementedError

    def ahead(self, step: int) -> tuple[Decision, ...] | None:
        """The decisions of step `step` of a sub-block and of the steps after it, one period's worth
        (at most a sub-block's steps), or None where they depend on the tokens. Run i of a chain
        of steps uses entry i % len."""
        return None

    def record(self, row: RowState, computed: Decision, masked_now: int, runs: int = 1) -> None:
        """After the row's step ran with the final decisions `computed` (an uncovered recall may
        have become a compute), `runs` times in a chain (only policies with a `period` chain)."""
        row.step += runs


class StepCountPolicy(ReusePolicy):
    """A rule of the step count alone: target layer j computes at steps 0, p_j, 2*p_j, ... Such a
    policy foretells a sub-block's next steps, so an engine may run them as one chain on the device."""

    def __init__(self, config, small_block_size: int, num_targets: int):
        super().__init__(config, small_block_size, num_targets)
        self.periods = tuple(self.layer_periods())
        self.period = math.lcm(*self.periods)

    def layer_periods(self) -> tuple[int, ...]:
        """One period per target layer, in layer order."""
        raise NotImplementedError

    def at_step(self, step: int) -> Decision:
        """The decisions at `step` of a sub-block (step 0 is a multiple of every period)."""
        return tuple(step % period == 0 for period in self.periods)

    def computes(self, row: RowState, masked_now: int) -> Decision:
        return self.at_step(row.step)

    def ahead(self, step: int) -> tuple[Decision, ...]:
        return tuple(self.at_step(step + i) for i in range(min(self.period, self.small_block_size)))
