"""The Fast-dLLM v2 block-diffusion decoding loop (prefill, blocks, sub-blocks, commit, trimming).

Row layout: each prompt is split at absolute block boundaries counted from its first token. Its
whole blocks go to the prefix (prefilled with the block-causal pattern); the tail shares the first
generation block with masks. Rows are aligned by left-padding whole blocks, so all rows share the
cache's prefix length and block slot; padding keys are masked out and positions are per row.

Every decision is per row and taken here: which sub-block it is in, whether it forwards the whole
block or only its sub-block (block cache), and, through the reuse schedule (reuse/schedule.py, two
calls per step), whether each layer runs, stores or recalls and how a recall replays. A step
is expressed as a `StepPlan` (plan.py) that an engine executes: the eager engine calls
transformers' layers, the graphed engine replays CUDA graphs; neither decides anything. Rows that
need the same kind of forward share one batched forward; a row never changes because of another
row in its batch. Counters and traces are kept here, from the plans.
"""

from __future__ import annotations

import dataclasses
import math
import time
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Callable

import torch

from .config import DiffusionSettings
from .engines.base import Engine
from .engines.eager import EagerEngine
from .plan import ForwardKind, ForwardPlan, LayerAction, StepPlan
from .reuse.schedule import ReuseSchedule, RowStep
from .runner import LayerStackRunner


@dataclass
class DecodeStats:
    """Counters of one decode; `as_dict()` is what `generate` reports."""

    forwards: int = 0
    prefill_forwards: int = 0
    commit_forwards: int = 0
    block_forwards: int = 0
    sub_block_forwards: int = 0
    denoising_steps: int = 0
    generated_tokens: int = 0
    wall_seconds: float = 0.0
    layer_runs: list[int] = field(default_factory=list)
    layer_skips: list[int] = field(default_factory=list)

    def as_dict(self) -> dict:
        calls, skipped = sum(self.layer_runs), sum(self.layer_skips)
        return {
            "forwards": self.forwards,
            "prefill_forwards": self.prefill_forwards,
            "commit_forwards": self.commit_forwards,
            "block_forwards": self.block_forwards,
            "sub_block_forwards": self.sub_block_forwards,
            "denoising_steps": self.denoising_steps,
            "generated_tokens": self.generated_tokens,
            "tokens_per_forward": self.generated_tokens / self.forwards if self.forwards else 0.0,
            "wall_seconds": self.wall_seconds,
            "layer_calls": calls,
            "layer_calls_skipped": skipped,
            "layer_runs": list(self.layer_runs),
            "layer_skips": list(self.layer_skips),
        }


@dataclass(frozen=True)
class RowLayout:
    """Where each prompt sits in the aligned cache."""

    full_blocks: list[int]  # whole prompt blocks per row
    tails: list[int]  # prompt tokens in the first generation block
    blocks_needed: list[int]  # generation blocks that reach max_new_tokens
    prefix_blocks: int  # aligned prefix length in blocks (max of full_blocks)

    @property
    def capacity_blocks(self) -> int:
        return self.prefix_blocks + max(self.blocks_needed)

    def last_position(self, row: int, block_size: int) -> int:
        return self.full_blocks[row] * block_size + self.blocks_needed[row] * block_size - 1


def plan_layout(lengths: list[int], block_size: int, max_new_tokens: int) -> RowLayout:
    full = [n // block_size for n in lengths]
    tails = [n % block_size for n in lengths]
    needed = [1 + math.ceil(max(0, max_new_tokens - (block_size - t)) / block_size) for t in tails]
    return RowLayout(full, tails, needed, max(full))


class BlockDiffusionDecoder:
    """Decodes a batch of unpadded prompts; see the module docstring."""

    # A run unmasks at least one slot per row, so a row with one masked slot left ends any chain
    # after this run: only steps whose rows all have this many masked slots are offered as chains
    # (a chain's launch costs the engine a read of its run count).
    chain_min_masked = 2

    def __init__(self, runner: LayerStackRunner, settings: DiffusionSettings, *, engine: Engine | None = None,
                 generator: torch.Generator | None = None,
                 on_block: Callable[[int, list[int]], None] | None = None, trace: bool = False):
        self.runner = runner
        self.settings = settings
        self.engine = engine if engine is not None else EagerEngine(runner, settings, generator=generator)
        # Optional per-forward record (tests replay the algorithm from it): one dict per forward.
        self.trace: list[dict] | None = [] if trace else None
        self.on_block = on_block
        self.stats = DecodeStats(layer_runs=[0] * runner.num_layers, layer_skips=[0] * runner.num_layers)
        # Every layer-reuse decision (which layers store or recall, how a recall replays, and when a
        # step may repeat); without reuse, or with a config that never recalls, every layer runs.
        self.reuse = ReuseSchedule.for_settings(settings, runner.num_layers)
        self.stop_ids = torch.tensor(settings.eos_token_ids or [-1], device=runner.device)

    # -- counters -------------------------------------------------------------------------------
    def _count_full_forward(self, kind: str) -> None:
        self.stats.forwards += 1
        setattr(self.stats, kind, getattr(self.stats, kind) + 1)
        for i in range(self.runner.num_layers):
            self.stats.layer_runs[i] += 1

    def _count_step(self, step: StepPlan) -> None:
        for plan in step:
            self.stats.forwards += 1
            if plan.kind is ForwardKind.BLOCK:
                self.stats.block_forwards += 1
            else:
                self.stats.sub_block_forwards += 1
            for i, action in enumerate(plan.actions):
                if action is LayerAction.RECALL:
                    self.stats.layer_skips[i] += 1
                else:
                    self.stats.layer_runs[i] += 1
        self.stats.denoising_steps += 1

    # -- main loop --------------------------------------------------------------------------
    @torch.no_grad()
    def decode(self, prompts: list[list[int]]) -> list[list[int]]:
        start_time = time.perf_counter()
        s, engine, dev = self.settings, self.engine, self.runner.device
        bs = s.block_size
        lengths = [len(p) for p in prompts]
        layout = plan_layout(lengths, bs, s.max_new_tokens)
        batch = len(prompts)
        prefix_len0 = layout.prefix_blocks * bs
        engine.start(batch, layout.capacity_blocks * bs, reuse_layers=self.reuse.layers)
        self.reuse.start(batch)

        pad = torch.tensor([(layout.prefix_blocks - f) * bs for f in layout.full_blocks], device=dev)
        block = torch.full((batch, bs), s.mask_token_id, dtype=torch.long, device=dev)
        fixed = torch.zeros((batch, bs), dtype=torch.bool, device=dev)
        prefix_tokens = torch.full((batch, prefix_len0), s.pad_token_id, dtype=torch.long, device=dev)
        for r, p in enumerate(prompts):
            f, t = layout.full_blocks[r], layout.tails[r]
            if f:
                prefix_tokens[r, prefix_len0 - f * bs:] = torch.tensor(p[: f * bs], device=dev)
            if t:
                block[r, :t] = torch.tensor(p[f * bs:], device=dev)
                fixed[r, :t] = True
        finished = torch.zeros(batch, dtype=torch.bool, device=dev)
        row_ids = list(range(batch))
        generated: list[list[int]] = [[] for _ in range(batch)]
        outputs: list[list[int] | None] = [None] * batch

        if prefix_len0 > 0:
            first = engine.prefill(prefix_tokens, pad)
            self._count_full_forward("prefill_forwards")
            needs_first = torch.tensor([t == 0 for t in layout.tails], device=dev)
            block[:, 0] = torch.where(needs_first, first, block[:, 0])
            finished |= needs_first & torch.isin(first, self.stop_ids)

        block_serial = 0
        while True:
            self._decode_block(block, pad, finished, block_serial, row_ids)
            block_serial += 1
            # Collect this block's new tokens and decide who leaves the batch.
            block_list, fixed_list = block.tolist(), fixed.tolist()
            fin_list = finished.tolist()
            keep = []
            for r, orig in enumerate(row_ids):
                new = [tok for tok, fx in zip(block_list[r], fixed_list[r]) if not fx]
                generated[orig].extend(new)
                if self.on_block is not None:
                    self.on_block(orig, new)
                if fin_list[r] or len(generated[orig]) >= s.max_new_tokens:
                    outputs[orig] = self._finalise(generated[orig])
                else:
                    keep.append(r)
            if not keep:
                break
            if len(keep) < len(row_ids):
                keep_t = torch.tensor(keep, device=dev)
                engine.keep_rows(keep_t)
                self.reuse.keep_rows(keep)
                block, pad, finished = block[keep_t], pad[keep_t], finished[keep_t]
                row_ids = [row_ids[r] for r in keep]
            next_first = engine.commit(block, pad)
            self._count_full_forward("commit_forwards")
            block = torch.full_like(block, s.mask_token_id)
            block[:, 0] = next_first
            fixed = torch.zeros_like(fixed[: len(row_ids)])
            finished = torch.isin(next_first, self.stop_ids)

        self.stats.generated_tokens = sum(self._count_real(o) for o in outputs)
        self.stats.wall_seconds = time.perf_counter() - start_time
        return outputs  # type: ignore[return-value]

    def _finalise(self, tokens: list[int]) -> list[int]:
        """Cut to max_new_tokens; everything after the first stop token becomes pad."""
        tokens = tokens[: self.settings.max_new_tokens]
        stops = set(self.settings.eos_token_ids)
        for i, tok in enumerate(tokens):
            if tok in stops:
                return tokens[: i + 1] + [self.settings.pad_token_id] * (len(tokens) - i - 1)
        return tokens

    def _count_real(self, tokens: list[int]) -> int:
        stops = set(self.settings.eos_token_ids)
        for i, tok in enumerate(tokens):
            if tok in stops:
                return i + 1
        return len(tokens)

    def _decode_block(self, block, pad, finished, block_serial, row_ids):
        s = self.settings
        bs, sbs = s.block_size, s.small_block_size
        nsb = bs // sbs
        n_rows = block.shape[0]
        # A row already finished here got a stop token from the prefill or the commit forward as
        # this block's first token: it ends now, without denoising the rest of the block.
        stopped = finished.tolist()
        sub_idx = [0] * n_rows
        self.reuse.start_block(n_rows, block_serial)
        ready = [False] * n_rows  # the row's block K/V were computed by a whole-block forward
        while True:
            # The step's one read from the device: per row and sub-block, the masked slots and
            # whether the sub-block's first slot is masked.
            masked = (block == s.mask_token_id).view(n_rows, nsb, sbs)
            host = torch.cat([masked.sum(-1), masked[:, :, 0].long()], dim=1).tolist()
            rows: dict[int, RowStep] = {}
            for r in range(n_rows):
                if stopped[r]:
                    continue
                cur = sub_idx[r]
                while cur < nsb and not host[r][cur]:
                    cur += 1
                if cur == nsb:
                    continue
                sub_idx[r] = cur
                use_sub = s.use_block_cache and ready[r] and not host[r][nsb + cur]
                kind = ForwardKind.SUB if use_sub else ForwardKind.BLOCK
                rows[r] = RowStep(kind, cur, host[r][cur])
            if not rows:
                return
            may_repeat = min(step.masked for step in rows.values()) >= self.chain_min_masked
            decided = self.reuse.decide(rows, may_repeat)
            step = self._plan_step(rows, decided.actions)
            repeat = decided.repeat
            result = self.engine.denoise(step, block, pad, finished, want_unmasked=self.trace is not None,
                                         repeat=repeat)
            for run in range(result.runs):  # runs after the first exist only where `repeat` allowed them
                run_step = step if run == 0 else self._with_actions(step, repeat.actions(run, step[0].actions))
                if self.trace is not None:
                    self._record(run_step, result.unmasked[run], block_serial, row_ids)
                self._count_step(run_step)
            self.reuse.record(result.runs)
            for r, row in rows.items():
                if row.kind is ForwardKind.BLOCK:
                    ready[r] = True

    @staticmethod
    def _with_actions(step: StepPlan, actions) -> StepPlan:
        """A chained run of `step`: the same forwards with the run's layer actions."""
        return tuple(dataclasses.replace(plan, actions=actions) for plan in step)

    def _plan_step(self, rows: dict[int, RowStep], actions) -> StepPlan:
        """Group rows by (kind, layer actions): one `ForwardPlan` each, recalls first."""
        groups = defaultdict(list)
        for r, row in rows.items():
            groups[(row.kind, actions[r])].append(r)
        return tuple(ForwardPlan(kind=kind, rows=tuple(group), subs=tuple(rows[r].sub for r in group),
                                 actions=group_actions, residual=self.reuse.residual)
                     for (kind, group_actions), group in sorted(groups.items(), key=lambda item: (item[0][0].value, item[0][1])))

    def _record(self, step: StepPlan, unmasked, block_serial, row_ids) -> None:
        sbs = self.settings.small_block_size
        for plan, mask in zip(step, unmasked):
            starts = plan.sub_starts(sbs)
            slots = [[o + j for j, u in enumerate(row) if u] for o, row in zip(starts, mask.tolist())]
            self.trace.append({"step": self.stats.denoising_steps, "block": block_serial,
                               "rows": [row_ids[r] for r in plan.rows], "kind": plan.kind.value,
                               "compute": not plan.recalls, "sub": list(plan.subs),
                               "tokens": plan.token_count(self.settings.block_size, sbs), "unmasked": slots})
