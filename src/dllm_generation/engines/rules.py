"""The decoding rule, once, for every engine: which hidden state predicts which slot, and which
predictions are committed to the block.

Both functions use tensor operations only (no host reads, no data-dependent shapes), so the
graphed engine captures them inside its CUDA graphs and the eager engine calls them as they are.
"""

from __future__ import annotations

import math

import torch


def prediction_index(sub_starts: torch.Tensor, token_starts: torch.Tensor, small_block_size: int) -> torch.Tensor:
    """[R, sbs] index, into each row's forwarded tokens, of the hidden state predicting each slot
    of its sub-block. Logits are shifted: slot j is predicted at slot j - 1. The block's slot 0
    is never masked (it holds the token chosen at the previous commit), so its clamp is harmless."""
    ar = torch.arange(small_block_size, device=sub_starts.device)
    return (sub_starts[:, None] - token_starts[:, None] - 1 + ar).clamp(min=0)


def unmask_confident(block: torch.Tensor, finished: torch.Tensor, rows: torch.Tensor, slots: torch.Tensor,
                     tokens: torch.Tensor, confidence: torch.Tensor, *, threshold: float, mask_token_id: int,
                     stop_ids: torch.Tensor) -> torch.Tensor:
    """Commit, for each row, every masked slot whose confidence is above `threshold`, and at
    least the most confident masked slot; mark rows that committed a stop token as finished.

    `block` [B, block_size] and `finished` [B] are updated in place at `rows` [R]; `slots`,
    `tokens`, `confidence` are [R, sbs]; `stop_ids` is a 1-D tensor of stop ids (-1 pads it).
    Returns the [R, sbs] mask of committed slots.
    """
    current = block[rows[:, None], slots]
    is_masked = current == mask_token_id
    confidence = torch.where(is_masked, confidence, torch.full_like(confidence, -math.inf))
    best = torch.arange(slots.shape[1], device=slots.device)[None, :] == confidence.argmax(dim=-1, keepdim=True)
    unmask = ((confidence > threshold) | best) & is_masked
    block[rows[:, None], slots] = torch.where(unmask, tokens, current)
    stops = (unmask & (tokens[..., None] == stop_ids).any(dim=-1)).any(dim=-1)
    finished[rows] = finished[rows] | stops
    return unmask


def step_repeats(block: torch.Tensor, rows: torch.Tensor, sub_starts: torch.Tensor, hold_first: torch.Tensor,
                 *, small_block_size: int, mask_token_id: int) -> torch.Tensor:
    """0-dim bool: would the decoder plan the step it just ran again, unchanged?

    It would while every row of the step still has a masked slot in its sub-block (it stays in that
    sub-block) and every row whose kind waits on its sub-block's first slot (`hold_first` [R]: a
    whole-block forward with the block cache on, which turns into a sub-block forward once that slot
    is unmasked) still has that slot masked. Rows outside the step keep their state, so their plans
    do not change either.
    """
    slots = sub_starts[:, None] + torch.arange(small_block_size, device=sub_starts.device)
    masked = block[rows[:, None], slots] == mask_token_id
    stays = masked.any(dim=-1) & (masked[:, 0] | ~hold_first)
    return stays.all()
