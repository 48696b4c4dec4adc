"""The eager engine: each planned forward calls transformers' decoder layers as they are.

It is the reference every other engine must reproduce (tokens, counters and trace in float32),
and the engine of every device, model and setting the graphed engine does not serve (sampling
included).
"""

from __future__ import annotations

import torch

from ..plan import ForwardKind, ForwardPlan, Repeat, ReusePlan, StepPlan, StepRuns
from ..sampling import choose_tokens
from .base import Engine, key_allowed
from .rules import prediction_index, unmask_confident


class EagerEngine(Engine):
    name = "eager"

    def __init__(self, runner, settings, *, generator: torch.Generator | None = None):
        super().__init__(runner, settings, generator=generator)
        # The graphed engine keeps its stop ids in its static buffers (they change with each call's settings).
        self.stop_ids = torch.tensor(settings.eos_token_ids or [-1], device=runner.device)

    def commit(self, block: torch.Tensor, pad: torch.Tensor) -> torch.Tensor:
        bs, dev, p = self.settings.block_size, block.device, self.cache.prefix_len
        positions = (p - pad)[:, None] + torch.arange(bs, device=dev)
        rows = torch.arange(block.shape[0], device=dev)
        self.cache.begin_forward("append", rows=None, row_index=rows)
        hidden = self.runner.hidden_states(block, positions, key_allowed(pad, p + bs), self.cache)
        self.cache.advance(bs)
        return self.greedy(hidden[:, -1])

    def denoise(self, step: StepPlan, block, pad, finished, *, want_unmasked: bool = False,
                repeat: Repeat | None = None) -> StepRuns:
        # Runs once whatever `repeat` allows: repeating from the host would save nothing here.
        unmasked = [self._forward(plan, block, pad, finished) for plan in step]
        return StepRuns(1, [unmasked] if want_unmasked else None)

    def _forward(self, plan: ForwardPlan, block, pad, finished) -> torch.Tensor:
        s, dev = self.settings, block.device
        bs, sbs = s.block_size, s.small_block_size
        prefix = self.cache.prefix_len
        rows = torch.tensor(plan.rows, device=dev)
        n_tokens = plan.token_count(bs, sbs)
        token_starts = torch.tensor(plan.token_starts(sbs), device=dev)
        sub_starts = torch.tensor(plan.sub_starts(sbs), device=dev)
        token_slots = token_starts[:, None] + torch.arange(n_tokens, device=dev)
        tokens = block[rows[:, None], token_slots]
        positions = (prefix - pad[rows])[:, None] + token_slots
        all_rows = len(plan.rows) == block.shape[0]
        starts = plan.token_starts(sbs)
        uniform = starts[0] if all(o == starts[0] for o in starts) else None
        self.cache.begin_forward(plan.kind.value, rows=None if all_rows else rows, row_index=rows,
                                 offsets=sub_starts if plan.kind is ForwardKind.SUB else None,
                                 uniform_offset=uniform)
        reuse = None
        if plan.stores or plan.recalls:
            reuse = ReusePlan(plan.actions, residual=plan.residual, offsets=token_starts)
        hidden = self.runner.hidden_states(tokens, positions, key_allowed(pad[rows], prefix + bs), self.cache, reuse)
        pick = prediction_index(sub_starts, token_starts, sbs)
        picked = hidden.gather(1, pick[..., None].expand(-1, -1, hidden.shape[-1]))
        tok, conf = choose_tokens(self.runner.logits(picked), temperature=s.temperature, top_p=s.top_p,
                                  generator=self.generator, mask_token_id=s.mask_token_id)
        slots = sub_starts[:, None] + torch.arange(sbs, device=dev)
        return unmask_confident(block, finished, rows, slots, tok, conf, threshold=s.threshold,
                                mask_token_id=s.mask_token_id, stop_ids=self.stop_ids)
