"""The chosen token and its confidence per masked position.

Temperature 0 is argmax with confidence = softmax probability of the argmax. With temperature > 0
every row is sampled (top-p filtered), and the confidence is the filtered, renormalised
probability of the sampled token, as in Fast-dLLM's `sample_with_top_p`.

The mask token itself is never a valid prediction: "unmasking" a position to the mask id would
make no progress (upstream loops forever if a model ever ranks it first), so it is excluded.
"""

from __future__ import annotations

import math

import torch


def choose_tokens(logits: torch.Tensor, *, temperature: float = 0.0, top_p: float = 1.0,
                  generator: torch.Generator | None = None,
                  mask_token_id: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """`logits` [..., vocab] (float32) -> (tokens [...], confidence [...])."""
    if mask_token_id is not None:
        logits = logits.clone()
        logits[..., mask_token_id] = -math.inf
    if temperature <= 0:
        probs = torch.softmax(logits, dim=-1)
        conf, tokens = probs.max(dim=-1)
        return tokens, conf
    probs = torch.softmax(logits / temperature, dim=-1)
    if top_p < 1.0:
        sorted_probs, order = probs.sort(dim=-1, descending=True)
        cumulative = sorted_probs.cumsum(dim=-1)
        drop_sorted = (cumulative - sorted_probs) > top_p  # keep the smallest set reaching top_p
        drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
        probs = probs.masked_fill(drop, 0.0)
        probs = probs / probs.sum(dim=-1, keepdim=True)
    flat = probs.reshape(-1, probs.shape[-1])
    tokens = torch.multinomial(flat, 1, generator=generator).reshape(probs.shape[:-1])
    conf = probs.gather(-1, tokens.unsqueeze(-1)).squeeze(-1)
    return tokens, conf
