"""Layer reuse as the decoder sees it: per step, `decide` each row's layer actions, then `record` the runs.

Those are the decoder's only two calls per denoising step (besides `start`, `keep_rows` and
`start_block` at decode and block boundaries). Behind them: the policy's per-row decisions, the
check that a planned recall is covered by the layer's stored entry, the cycle a step-count policy
lets an engine chain, and what each row's entries hold. What an entry holds is known from the
decisions themselves (engines store exactly what was planned), so none of this reads the device.
Without reuse (no config, or one that never recalls) every layer runs and nothing is stored.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..plan import ForwardKind, LayerAction, Repeat, layer_actions
from .policies import make_policy

Actions = tuple[LayerAction, ...]


@dataclass(frozen=True)
class RowStep:
    """What the decoder planned for one row this step, before layer reuse."""

    kind: ForwardKind
    sub: int  # the sub-block it denoises
    masked: int  # masked slots of that sub-block before the step


@dataclass(frozen=True)
class StepActions:
    """The decision for one step: per row, one action per layer; and the leave to repeat it, if any."""

    actions: dict[int, Actions]
    repeat: Repeat | None


class ReuseSchedule:
    """One decode's layer-reuse decisions and the bookkeeping behind them."""

    def __init__(self, config, layers: tuple[int, ...], *, num_layers: int, block_size: int,
                 small_block_size: int, use_block_cache: bool):
        # Target layers that may recall, in layer order; () decodes exactly as no reuse.
        self.layers = tuple(layers)
        self.num_layers = num_layers
        self.block_size, self.small_block_size = block_size, small_block_size
        self.use_block_cache = use_block_cache
        self.policy = make_policy(config, small_block_size, len(self.layers)) if self.layers else None
        self.residual = self.policy is not None and config.mode == "residual"
        # Per row and target layer: (sub-block serial, first slot, end slot) of its stored entry.
        self.entries: list[dict[int, tuple[int, int, int]]] = []
        self.rows = []  # per row: the policy's state in the current block
        self.block_serial = 0
        self._plain = Repeat(block_rows_wait=use_block_cache)
        self._cycles: dict[int, Repeat] = {}  # a step-count policy's chains, by place in its cycle
        self._pending = None  # the decided step, until `record`

    @classmethod
    def for_settings(cls, settings, num_layers: int) -> "ReuseSchedule":
        return cls(settings.layer_reuse, settings.recalling_layers, num_layers=num_layers,
                   block_size=settings.block_size, small_block_size=settings.small_block_size,
                   use_block_cache=settings.use_block_cache)

    # -- boundaries ------------------------------------------------------------------------------
    def start(self, batch: int) -> None:
        """A new decode: no row holds an entry."""
        self.entries = [{} for _ in range(batch)]

    def keep_rows(self, keep: list[int]) -> None:
        """Rows `keep` stay in the batch (in that order), as the engine's cache keeps them."""
        self.entries = [self.entries[r] for r in keep]

    def start_block(self, n_rows: int, block_serial: int) -> None:
        """A new block: every row's schedule starts again."""
        self.block_serial = block_serial
        self.rows = [self.policy.new_row() for _ in range(n_rows)] if self.policy is not None else []

    # -- per step --------------------------------------------------------------------------------
    def decide(self, rows: dict[int, RowStep], may_repeat: bool) -> StepActions:
        """Each deciding row's layer actions, and, where `may_repeat` and nothing but the block's
        masks would change the next plans, the leave to repeat the step."""
        if self.policy is None:
            self._pending = None
            plain = (LayerAction.RUN,) * self.num_layers
            return StepActions({r: plain for r in rows}, self._plain if may_repeat else None)
        planned = {r: self.policy.decide(self.rows[r], step.sub, step.masked) for r, step in rows.items()}
        spans = {r: self._span(step) for r, step in rows.items()}
        computes = {r: self._covered(r, planned[r], spans[r]) for r in rows}
        actions = {r: layer_actions(self.num_layers, self.layers, c) for r, c in computes.items()}
        repeat = None
        if may_repeat and computes == planned and len(set(actions.values())) == 1:
            repeat = self._cycle(rows)
        self._pending = (rows, computes, actions, spans, repeat)
        return StepActions(actions, repeat)

    def record(self, runs: int) -> None:
        """The decided step ran `runs` times (runs after the first only where a repeat was given)."""
        if self._pending is None:
            return
        rows, computes, actions, spans, repeat = self._pending
        self._pending = None
        for r in rows:
            for run in range(runs):
                run_actions = actions[r] if run == 0 else repeat.actions(run, actions[r])
                for layer in self.layers:
                    if run_actions[layer] is LayerAction.STORE:
                        self.entries[r][layer] = spans[r]
            self.policy.record(self.rows[r], computes[r], rows[r].masked, runs)

    # -- behind `decide` -------------------------------------------------------------------------
    def _span(self, step: RowStep) -> tuple[int, int, int]:
        """The row's sub-block serial and the block slots its forward feeds: what an entry it stores
        holds, and what a recall of it needs covered. Entries are valid only in the sub-block they
        were stored in."""
        serial = self.block_serial * (self.block_size // self.small_block_size) + step.sub
        if step.kind is ForwardKind.BLOCK:
            return serial, 0, self.block_size
        return serial, step.sub * self.small_block_size, (step.sub + 1) * self.small_block_size

    def _covered(self, r: int, computes, span):
        """A recall needs the layer's entry to be from this sub-block and to cover the requested
        slots (an entry stored by a sub-block forward does not cover a whole-block forward); any
        other planned recall computes."""
        if all(computes):
            return computes
        tag, lo, hi = span
        entries = self.entries[r]
        return tuple(
            compute or (entry := entries.get(layer)) is None or entry[0] != tag or entry[1] > lo or entry[2] < hi
            for layer, compute in zip(self.layers, computes))

    def _cycle(self, rows) -> Repeat | None:
        """Leave to chain the step through its rows' common cycle of decisions: given when the
        policy decides by the step count alone and every row of the step is at the same place in
        it (one set of layer actions per run). A recall later in the chain is covered: by this
        step's check, or by an entry stored earlier in the chain for the same slots."""
        period = self.policy.period
        if period is None:
            return None
        places = {self.rows[r].step % period for r in rows}
        if len(places) != 1:
            return None
        place = places.pop()
        repeat = self._cycles.get(place)
        if repeat is None:  # one per place in the cycle, made once per decode
            cycle = tuple(layer_actions(self.num_layers, self.layers, computes)
                          for computes in self.policy.ahead(place))
            repeat = self._cycles[place] = Repeat(block_rows_wait=self.use_block_cache, cycle=cycle)
        return repeat
