"""The Fast-dLLM v2 block-diffusion decoding loop (prefill, blocks, sub-blocks, commit, trimming).

Row layout: each prompt is split at absolute block boundaries counted from its first token. Its
whole blocks go to the prefix (prefilled with the block-causal pattern); the tail shares the first
generation block with masks. Rows are aligned by left-padding whole blocks, so all rows share the
cache's prefix length and block slot; padding keys are masked out and positions are per row.

Every decision is per row: which sub-block it is in, whether it forwards the whole block or only
its sub-block (block-cache fast path), whether its layer-reuse step computes or recalls. Rows that
need the same kind of forward share one batched forward; a row never changes because of another
row in its batch.
"""

from __future__ import annotations

import math
import time
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Callable

import torch

from .cache import BlockDiffusionCache
from .config import DiffusionSettings
from .reuse_policy import ReuseSchedule, RowReuseState
from .runner import LayerStackRunner, ReusePlan
from .sampling import choose_tokens


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

    def __init__(self, runner: LayerStackRunner, settings: DiffusionSettings, *,
                 generator: torch.Generator | None = None,
                 on_block: Callable[[int, list[int]], None] | None = None, trace: bool = False,
                 fast_path=None):
        self.runner = runner
        # Optional `fast_path.FastPathEngine`: runs the denoise/commit forwards (same decisions).
        self.fast = fast_path
        # Optional per-forward record (tests replay the algorithm from it): one dict per forward.
        self.trace: list[dict] | None = [] if trace else None
        self._row_ids: list[int] = []
        self.s = settings
        self.generator = generator
        self.on_block = on_block
        self.stats = DecodeStats()
        self.reuse_layers = frozenset(settings.reuse_layers) if settings.layer_reuse is not None else frozenset()
        self.schedule = (ReuseSchedule(settings.layer_reuse, settings.small_block_size)
                         if settings.layer_reuse is not None else None)
        self.residual = settings.layer_reuse is not None and settings.layer_reuse.mode == "residual"
        dev = runner.device
        self.eos = torch.tensor(settings.eos_token_ids or [-1], device=dev)

    # -- helpers ----------------------------------------------------------------------------
    def _forward(self, kind, tokens, positions, allowed, rows, row_index, *, offsets=None,
                 uniform_offset=None, plan=None):
        self.cache.begin_forward(kind, rows=rows, row_index=row_index, offsets=offsets, uniform_offset=uniform_offset)
        hidden = self.runner.hidden_states(tokens, positions, allowed, self.cache, plan)
        self.stats.forwards += 1
        return hidden

    def _key_allowed(self, pad: torch.Tensor, kv_len: int) -> torch.Tensor:
        """[R, 1, 1, kv]: every non-padding key is visible (block queries see the whole block)."""
        keys = torch.arange(kv_len, device=pad.device)
        return (keys[None, :] >= pad[:, None])[:, None, None, :]

    # -- main loop --------------------------------------------------------------------------
    @torch.no_grad()
    def decode(self, prompts: list[list[int]]) -> list[list[int]]:
        start_time = time.perf_counter()
        s, runner, dev = self.s, self.runner, self.runner.device
        bs = s.block_size
        lengths = [len(p) for p in prompts]
        layout = plan_layout(lengths, bs, s.max_new_tokens)
        batch = len(prompts)
        prefix_len0 = layout.prefix_blocks * bs
        if self.fast is not None:
            self.cache = self.fast.make_cache(runner.num_layers, batch, layout.capacity_blocks * bs, bs, self.reuse_layers)
        else:
            self.cache = BlockDiffusionCache(runner.num_layers, batch, layout.capacity_blocks * bs, bs)

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
            first = self._prefill(prefix_tokens, pad)
            needs_first = torch.tensor([t == 0 for t in layout.tails], device=dev)
            block[:, 0] = torch.where(needs_first, first, block[:, 0])
            finished |= needs_first & torch.isin(first, self.eos)

        block_serial = 0
        while True:
            self._row_ids = row_ids
            self._decode_block(block, pad, finished, block_serial)
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
                self.cache.batch_select_indices(keep_t)
                block, pad, finished = block[keep_t], pad[keep_t], finished[keep_t]
                row_ids = [row_ids[r] for r in keep]
            next_first = self._commit(block, pad)
            block = torch.full_like(block, s.mask_token_id)
            block[:, 0] = next_first
            fixed = torch.zeros_like(fixed[: len(row_ids)])
            finished = torch.isin(next_first, self.eos)

        self.stats.layer_runs = list(runner.layer_runs)
        self.stats.layer_skips = list(runner.layer_skips)
        self.stats.generated_tokens = sum(self._count_real(o) for o in outputs)
        self.stats.wall_seconds = time.perf_counter() - start_time
        return outputs  # type: ignore[return-value]

    def _finalise(self, tokens: list[int]) -> list[int]:
        """Cut to max_new_tokens; everything after the first stop token becomes pad."""
        tokens = tokens[: self.s.max_new_tokens]
        stops = set(self.s.eos_token_ids)
        for i, tok in enumerate(tokens):
            if tok in stops:
                return tokens[: i + 1] + [self.s.pad_token_id] * (len(tokens) - i - 1)
        return tokens

    def _count_real(self, tokens: list[int]) -> int:
        stops = set(self.s.eos_token_ids)
        for i, tok in enumerate(tokens):
            if tok in stops:
                return i + 1
        return len(tokens)

    def _greedy(self, hidden: torch.Tensor) -> torch.Tensor:
        return choose_tokens(self.runner.logits(hidden), mask_token_id=self.s.mask_token_id)[0]

    def _prefill(self, prefix_tokens: torch.Tensor, pad: torch.Tensor) -> torch.Tensor:
        """Block-causal forward over the prompts' whole blocks; returns the greedy next token."""
        bs, dev = self.s.block_size, prefix_tokens.device
        n = prefix_tokens.shape[1]
        slots = torch.arange(n, device=dev)
        block_causal = (slots[None, :] // bs) <= (slots[:, None] // bs)  # [q, kv]
        allowed = block_causal[None] & (slots[None, None, :] >= pad[:, None, None])
        allowed = (allowed | torch.eye(n, dtype=torch.bool, device=dev)[None])[:, None]  # padding queries see themselves
        positions = (slots[None, :] - pad[:, None]).clamp(min=0)
        rows = torch.arange(prefix_tokens.shape[0], device=dev)
        hidden = self._forward("append", prefix_tokens, positions, allowed, None, rows)
        self.cache.advance(n)
        self.stats.prefill_forwards += 1
        return self._greedy(hidden[:, -1])

    def _commit(self, block: torch.Tensor, pad: torch.Tensor) -> torch.Tensor:
        """Forward the clean block into the prefix; its last logits give the next block's first token."""
        if self.fast is not None:
            return self.fast.commit(self, block, pad)
        bs, dev, p = self.s.block_size, block.device, self.cache.prefix_len
        positions = (p - pad)[:, None] + torch.arange(bs, device=dev)
        rows = torch.arange(block.shape[0], device=dev)
        hidden = self._forward("append", block, positions, self._key_allowed(pad, p + bs), None, rows)
        self.cache.advance(bs)
        self.stats.commit_forwards += 1
        return self._greedy(hidden[:, -1])

    def _decode_block(self, block, pad, finished, block_serial):
        s, dev = self.s, block.device
        bs, sbs = s.block_size, s.small_block_size
        nsb = bs // sbs
        n_rows = block.shape[0]
        # A row already finished here got a stop token from the prefill or the commit forward as
        # this block's first token: it ends now, without denoising the rest of the block.
        stopped = finished.tolist()
        sub_idx = [0] * n_rows
        reuse_state = [RowReuseState() for _ in range(n_rows)]
        ready = [False] * n_rows  # the row's block K/V were computed by a whole-block forward
        ar_sub = torch.arange(sbs, device=dev)
        prefix = self.cache.prefix_len
        while True:
            masked = block == s.mask_token_id
            masked_count = masked.view(n_rows, nsb, sbs).sum(-1).tolist()  # per row and sub-block
            first_masked = masked[:, ::sbs].tolist()
            plans = {}
            for r in range(n_rows):
                if stopped[r]:
                    continue
                cur = sub_idx[r]
                while cur < nsb and not masked_count[r][cur]:
                    cur += 1
                if cur == nsb:
                    continue
                if cur != sub_idx[r]:
                    sub_idx[r], reuse_state[r] = cur, RowReuseState()
                kind = "sub" if (s.use_block_cache and ready[r] and not first_masked[r][cur]) else "block"
                compute = self.schedule is None or self.schedule.computes(reuse_state[r], masked_count[r][cur])
                plans[r] = (kind, compute)
            if not plans:
                return
            if self.reuse_layers:
                self._compute_where_uncovered(plans, sub_idx, block_serial, sbs, dev)
            groups = defaultdict(list)
            for r, key in plans.items():
                groups[key].append(r)
            if self.fast is not None:
                self.fast.denoise(self, block, pad, finished, sorted(groups.items()), sub_idx, block_serial)
            for (kind, compute), rows in sorted(groups.items()):
                if self.fast is None:
                    self._denoise(block, masked, pad, finished, rows, kind, compute, sub_idx, block_serial,
                                  prefix, ar_sub, n_rows)
                for r in rows:
                    ReuseSchedule.record(reuse_state[r], compute, masked_count[r][sub_idx[r]])
                    if kind == "block":
                        ready[r] = True
            self.stats.denoising_steps += 1

    def _compute_where_uncovered(self, plans, sub_idx, block_serial, sbs, dev):
        """A recall needs a stored entry for this sub-block covering the requested slots."""
        recall_rows = [r for r, (_, c) in plans.items() if not c]
        if not recall_rows:
            return
        entry = self.cache.layers[min(self.reuse_layers)]
        rows_t = torch.tensor(recall_rows, device=dev)
        tags = torch.tensor([self._tag(block_serial, sub_idx[r]) for r in recall_rows], device=dev)
        spans = [self._reuse_span(plans[r][0], sub_idx[r]) for r in recall_rows]
        start = torch.tensor([lo for lo, _ in spans], device=dev)
        end = torch.tensor([hi for _, hi in spans], device=dev)
        covered = entry.reuse_covers(rows_t, tags, start, end).tolist()
        for r, ok in zip(recall_rows, covered):
            if not ok:
                plans[r] = (plans[r][0], True)

    def _tag(self, block_serial: int, sub: int) -> int:
        """The serial of a sub-block: reuse entries are valid only for the one they were stored in."""
        return block_serial * (self.s.block_size // self.s.small_block_size) + sub

    def _reuse_span(self, kind: str, sub: int) -> tuple[int, int]:
        """Block slots a forward of `kind` feeds (and a reuse entry stored by it covers)."""
        if kind == "block":
            return 0, self.s.block_size
        return sub * self.s.small_block_size, (sub + 1) * self.s.small_block_size

    def _denoise(self, block, masked, pad, finished, rows, kind, compute, sub_idx, block_serial, prefix,
                 ar_sub, n_rows):
        s, dev = self.s, block.device
        bs, sbs = s.block_size, s.small_block_size
        rows_t = torch.tensor(rows, device=dev)
        all_rows = len(rows) == n_rows
        subset = None if all_rows else rows_t
        sub_starts = [sub_idx[r] * sbs for r in rows]
        offs = torch.tensor(sub_starts, device=dev)
        uniform = sub_starts[0] if all(o == sub_starts[0] for o in sub_starts) else None
        base = prefix - pad[rows_t]
        if kind == "block":
            tokens = block[rows_t]
            positions = base[:, None] + torch.arange(bs, device=dev)
            # Shifted logits: slot i is predicted at slot i-1 (slot 0 is never masked).
            pick = (offs[:, None] - 1 + ar_sub).clamp(min=0)
            reuse_offsets = torch.zeros_like(offs)
        else:
            slots = offs[:, None] + ar_sub
            tokens = block[rows_t].gather(1, slots)
            positions = base[:, None] + slots
            pick = (ar_sub - 1).clamp(min=0).expand(len(rows), sbs)
            reuse_offsets = offs
        plan = None
        if self.reuse_layers:
            tags = torch.tensor([self._tag(block_serial, sub_idx[r]) for r in rows], device=dev)
            plan = ReusePlan(self.reuse_layers, recall=not compute, residual=self.residual,
                             tags=tags, offsets=reuse_offsets)
        hidden = self._forward(kind, tokens, positions, self._key_allowed(pad[rows_t], prefix + bs), subset, rows_t,
                               offsets=offs, uniform_offset=uniform, plan=plan)
        if kind == "block":
            self.stats.block_forwards += 1
        else:
            self.stats.sub_block_forwards += 1
        picked = hidden.gather(1, pick[..., None].expand(-1, -1, hidden.shape[-1]))
        logits = self.runner.logits(picked)
        tok, conf = choose_tokens(logits, temperature=s.temperature, top_p=s.top_p, generator=self.generator,
                                  mask_token_id=s.mask_token_id)
        slots = offs[:, None] + ar_sub
        current = block[rows_t].gather(1, slots)
        is_masked = masked[rows_t].gather(1, slots)
        conf = torch.where(is_masked, conf, torch.full_like(conf, -math.inf))
        unmask = conf > s.threshold
        unmask[torch.arange(len(rows), device=dev), conf.argmax(dim=-1)] = True
        unmask &= is_masked
        block[rows_t[:, None], slots] = torch.where(unmask, tok, current)
        finished[rows_t] |= (unmask & torch.isin(tok, self.eos)).any(dim=-1)
        if self.trace is not None:
            unmasked = [[o + j for j, u in enumerate(row) if u] for o, row in zip(sub_starts, unmask.tolist())]
            self.trace.append({"block": block_serial, "rows": [self._row_ids[r] for r in rows], "kind": kind,
                               "compute": compute, "sub": [sub_idx[r] for r in rows], "tokens": tokens.shape[1],
                               "unmasked": unmasked})
