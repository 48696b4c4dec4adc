"""When a layer-reuse step computes each target layer and when it recalls it, per row, decided on the device.

Every policy restarts at each sub-block, and step 0 of a sub-block always computes (nothing is
stored for it yet). The decisions are tensor operations on the rows' schedule state, which lives on
the device (`ReuseState`); they are computed from the block before the step and travel to the host
in the step's one device-to-host read, together with the masked counts the decoder needs anyway. No
policy adds a read, and every engine executes the decisions unchanged.

* `fixed`: compute at steps 0, k, 2k, ...
* `unmask_drift`: a stored entry goes stale as tokens are unmasked (a masked slot's input changes
  from the mask embedding to a token, and every other position's features follow). Recall while the
  share of the sub-block unmasked since the entry was stored is at most `tolerance` and the entry is
  younger than `max_staleness` steps; compute otherwise. Tolerance 0 never recalls (each step
  unmasks at least one token), so it equals no reuse; tolerance 1 with `max_staleness=k` equals the
  fixed policy with period k.
* `per_layer`: target layer j computes at steps 0, layer_k[j], 2*layer_k[j], ... A depth-aware
  schedule (say, early layers refreshed more often than late ones).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class ReuseState:
    """Every row's place in its sub-block's schedule, as [rows] tensors on the decoding device."""

    sub: torch.Tensor  # the sub-block the row's schedule belongs to (-1: none yet)
    step: torch.Tensor  # denoising steps taken in that sub-block
    stored_at: torch.Tensor  # the step whose forward stored every target layer's entry
    masked_at_store: torch.Tensor  # masked slots of the sub-block at that step

    @classmethod
    def fresh(cls, rows: int, device) -> "ReuseState":
        zeros = torch.zeros(rows, dtype=torch.long, device=device)
        return cls(sub=torch.full_like(zeros, -1), step=zeros.clone(), stored_at=zeros.clone(),
                   masked_at_store=zeros.clone())


class ReuseSchedule:
    """Decides, per row and target layer, compute (True) or recall (False) at the next step."""

    def __init__(self, config, small_block_size: int, num_targets: int, device):
        self.config = config
        self.num_targets = num_targets
        periods = config.layer_k if config.policy == "per_layer" else [config.k] * num_targets
        self.periods = torch.tensor(periods, dtype=torch.long, device=device)
        if config.policy == "unmask_drift":
            # share = unmasked / small_block_size > tolerance, as the smallest integer count that
            # exceeds it (the comparison then needs no floating point on the device).
            self.min_unmasked = next(n for n in range(small_block_size + 2) if n / small_block_size > config.tolerance)

    def decide(self, state: ReuseState, sub: torch.Tensor, masked_now: torch.Tensor) -> torch.Tensor:
        """[rows, targets] decisions for rows now in sub-block `sub` with `masked_now` masked slots
        there; a row that entered another sub-block starts its schedule again."""
        moved = sub != state.sub
        state.sub = sub.clone()
        state.step = torch.where(moved, torch.zeros_like(state.step), state.step)
        first = (state.step == 0)[:, None]
        if self.config.policy == "unmask_drift":
            unmasked = state.masked_at_store - masked_now
            due = unmasked >= self.min_unmasked
            if self.config.max_staleness is not None:
                due = due | (state.step - state.stored_at >= self.config.max_staleness)
            due = due[:, None].expand(-1, self.num_targets)
        else:
            due = state.step[:, None] % self.periods[None, :] == 0
        return due | first

    @staticmethod
    def record(state: ReuseState, computed: torch.Tensor, masked_now: torch.Tensor, active: torch.Tensor) -> None:
        """After the step ran with the final decisions `computed` (an uncovered recall may have
        become a compute). The drift policy's entry age counts from the last step that computed
        every target layer; rows that did not step (`active` False) keep their state."""
        stored = computed.all(dim=-1) & active
        state.stored_at = torch.where(stored, state.step, state.stored_at)
        state.masked_at_store = torch.where(stored, masked_now, state.masked_at_store)
        state.step = state.step + active.long()
