"""The decoder-engine contract as data: a denoising step, and what each layer does in it.

`BlockDiffusionDecoder` decides, per row, which sub-block it denoises, whether it forwards its
whole block or only that sub-block, and what each decoder layer does (run, run and store its
result for layer reuse, or recall the stored result without running, replaying its output or its
residual). Rows with the same kind of forward and the same layer actions form one `ForwardPlan`;
a `StepPlan` is one denoising step. Engines (`engines.eager`, `engines.graphed`) and the eager
layer stack (`runner.py`) read these types and nothing else of the decoder's: none of them
decides anything, so the tokens, counters and trace of a decode do not depend on the engine.

This module imports nothing from the package, so every layer of it may depend on it.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch


class ForwardKind(str, Enum):
    """What a row forwards in a denoising step."""

    BLOCK = "block"  # its whole current block: every slot's K/V is refreshed
    SUB = "sub"  # only its current sub-block (block cache on): the rest of the block's K/V is kept


class LayerAction(str, Enum):
    """What one decoder layer does in a forward."""

    RUN = "run"
    STORE = "store"  # run, and keep the layer's input and output for later recall (layer reuse)
    RECALL = "recall"  # do not run: return the output stored earlier in this sub-block


@dataclass(frozen=True)
class ForwardPlan:
    """One forward of rows that share a kind and per-layer actions."""

    kind: ForwardKind
    rows: tuple[int, ...]  # batch rows of the decoder's current batch
    subs: tuple[int, ...]  # each row's current sub-block (index inside the block)
    actions: tuple[LayerAction, ...]  # one per decoder layer
    # Recalled layers replay their stored residual (output - input) on the current input, so stores
    # keep the input too (layer reuse mode "residual"); without stores or recalls it changes nothing.
    residual: bool = False

    @property
    def recalls(self) -> bool:
        return LayerAction.RECALL in self.actions

    @property
    def stores(self) -> bool:
        return LayerAction.STORE in self.actions

    def token_count(self, block_size: int, small_block_size: int) -> int:
        return block_size if self.kind is ForwardKind.BLOCK else small_block_size

    def token_starts(self, small_block_size: int) -> list[int]:
        """First block slot of each row's tokens in this forward."""
        if self.kind is ForwardKind.BLOCK:
            return [0] * len(self.rows)
        return [sub * small_block_size for sub in self.subs]

    def sub_starts(self, small_block_size: int) -> list[int]:
        """First block slot of the sub-block each row denoises."""
        return [sub * small_block_size for sub in self.subs]


# One denoising step: its forwards, in the order (kind, recall before compute) that traces use.
StepPlan = tuple[ForwardPlan, ...]


@dataclass(frozen=True)
class Repeat:
    """The decoder's leave to run a step again while `rules.step_repeats` holds.

    It is given when nothing but the block's masks could change the next plan, so an engine may
    chain the runs on the device and the host reads once per chain instead of once per step. Without
    layer reuse every run repeats the step unchanged. With a schedule that decides by the step count
    alone, the layer actions change from run to run in a known order (`cycle`: run i takes
    `cycle[i % len(cycle)]`, and `cycle[0]` is the step's own). Each run unmasks at least one slot of
    every row's sub-block, so a chain never runs more than a sub-block's size. It is given only for
    steps whose forwards all share their layer actions (so each run is one set of actions).
    """

    block_rows_wait: bool  # whole-block rows stay whole-block only while their sub-block's first slot is masked
    cycle: tuple[tuple[LayerAction, ...], ...] = ()  # per-run layer actions; empty: the step's own every run

    def hold_first(self, plan: ForwardPlan) -> list[bool]:
        """Per row of `plan`: does its kind depend on its sub-block's first slot staying masked?"""
        return [plan.kind is ForwardKind.BLOCK and self.block_rows_wait] * len(plan.rows)

    def actions(self, run: int, step_actions: tuple[LayerAction, ...]) -> tuple[LayerAction, ...]:
        """The layer actions of run `run` of a step whose own actions are `step_actions`."""
        return self.cycle[run % len(self.cycle)] if self.cycle else step_actions


@dataclass
class StepRuns:
    """What an engine reports for a step: how often it ran, and with `want_unmasked`, per run and
    forward, the [R, sbs] mask of the slots it unmasked."""

    runs: int
    unmasked: list[list[Any]] | None = None


@dataclass
class ReusePlan:
    """What each layer does in one eager forward (run, run and store, recall) and where entries go."""

    actions: tuple[LayerAction, ...]
    residual: bool
    offsets: "torch.Tensor"  # first block slot of the forward's tokens, per row


def layer_actions(num_layers: int, targets: tuple[int, ...], computes: tuple[bool, ...]) -> tuple[LayerAction, ...]:
    """Per-layer actions of a forward: target layer `targets[j]` stores if `computes[j]`, else recalls."""
    actions = [LayerAction.RUN] * num_layers
    for layer, compute in zip(targets, computes):
        actions[layer] = LayerAction.STORE if compute else LayerAction.RECALL
    return tuple(actions)

