"""What the decoder asks of an engine, and the parts every engine shares.

An engine owns the decode's cache and executes the decoder's plans: the prompt prefill, one
denoising step (`StepPlan`), and the commit of a clean block. It reports what it unmasked and
nothing else; counters, traces and decisions stay with the decoder. Engines read the decoder's
plans (plan.py), never the layer-reuse config: what a layer does, and how a recall replays, is in
each `ForwardPlan`.
"""

from __future__ import annotations

import torch

from ..cache import BlockDiffusionCache
from ..config import DiffusionSettings
from ..runner import LayerStackRunner
from ..sampling import choose_tokens
from ..plan import Repeat, StepPlan, StepRuns


def key_allowed(pad: torch.Tensor, kv_len: int) -> torch.Tensor:
    """[R, 1, 1, kv]: every non-padding key is visible (block queries see the whole block)."""
    keys = torch.arange(kv_len, device=pad.device)
    return (keys[None, :] >= pad[:, None])[:, None, None, :]


class Engine:
    """Base engine: the cache, the prompt prefill and row selection; subclasses run the steps."""

    name = "base"

    def __init__(self, runner: LayerStackRunner, settings: DiffusionSettings, *, generator: torch.Generator | None = None):
        self.runner = runner
        self.settings = settings
        self.generator = generator
        self.cache: BlockDiffusionCache | None = None

    # -- lifecycle ------------------------------------------------------------------------------
    def start(self, batch: int, capacity: int, reuse_layers: tuple[int, ...] = ()) -> None:
        """A fresh cache for `batch` rows and `capacity` slots; `reuse_layers` are the layers the
        decode's plans may store or recall (the eager cache allocates their entries on first store)."""
        self.cache = BlockDiffusionCache(self.runner.num_layers, batch, capacity, self.settings.block_size)

    @property
    def prefix_len(self) -> int:
        return self.cache.prefix_len

    def keep_rows(self, indices: torch.Tensor) -> None:
        """Rows `indices` stay in the batch (in that order); the others leave."""
        self.cache.batch_select_indices(indices)

    def describe(self):
        return self.name

    # -- forwards -------------------------------------------------------------------------------
    def greedy(self, hidden: torch.Tensor) -> torch.Tensor:
        return choose_tokens(self.runner.logits(hidden), mask_token_id=self.settings.mask_token_id)[0]

    def prefill(self, prefix_tokens: torch.Tensor, pad: torch.Tensor) -> torch.Tensor:
        """Block-causal forward over the prompts' whole blocks; returns the greedy next token per row."""
        bs, dev = self.settings.block_size, prefix_tokens.device
        n = prefix_tokens.shape[1]
        slots = torch.arange(n, device=dev)
        block_causal = (slots[None, :] // bs) <= (slots[:, None] // bs)  # [q, kv]
        allowed = block_causal[None] & (slots[None, None, :] >= pad[:, None, None])
        allowed = (allowed | torch.eye(n, dtype=torch.bool, device=dev)[None])[:, None]  # padding queries see themselves
        positions = (slots[None, :] - pad[:, None]).clamp(min=0)
        rows = torch.arange(prefix_tokens.shape[0], device=dev)
        self.cache.begin_forward("append", rows=None, row_index=rows)
        hidden = self.runner.hidden_states(prefix_tokens, positions, allowed, self.cache)
        self.cache.advance(n)
        return self.greedy(hidden[:, -1])

    def commit(self, block: torch.Tensor, pad: torch.Tensor) -> torch.Tensor:
        """Forward the clean block into the prefix; its last logits give the next block's first token."""
        raise NotImplementedError

    def denoise(self, step: StepPlan, block: torch.Tensor, pad: torch.Tensor, finished: torch.Tensor,
                *, want_unmasked: bool = False, repeat: Repeat | None = None) -> StepRuns:
        """Run one denoising step, updating `block` and `finished` in place; with `repeat`, the
        engine may run it again while `rules.step_repeats` holds, run i with the layer actions
        `repeat.actions(i, ...)`. With `want_unmasked`, the result keeps each run's masks of the
        slots it unmasked (for traces)."""
        raise NotImplementedError
