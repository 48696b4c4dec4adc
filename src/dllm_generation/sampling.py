"""The chosen token and its confidence per masked position.

Confidences are probabilities under the softmax over the whole vocabulary, the mask token
included, as the reference Fast-dLLM v2 sampler computes them; only the choice excludes the mask
token. Renormalising over the other tokens instead would raise every confidence a little, and a
decision near the threshold could then differ from the reference.

Temperature 0 is argmax with confidence = that softmax probability of the argmax. With
temperature > 0 every row is sampled (top-p filtered as the reference filters, mask included),
and the confidence is the filtered, renormalised probability of the sampled token, as in
Fast-dLLM's `sample_with_top_p`.

The mask token itself is never a valid prediction: "unmasking" a position to the mask id would
make no progress (upstream loops forever if a model ever ranks it first), so it is never chosen.
"""

from __future__ import annotations

import torch


def choose_tokens(logits: torch.Tensor, *, temperature: float = 0.0, top_p: float = 1.0,
                  generator: torch.Generator | None = None,
                  mask_token_id: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """`logits` [..., vocab] (float32) -> (tokens [...], confidence [...])."""
    if temperature <= 0:
        probs = torch.softmax(logits, dim=-1)  # over the whole vocabulary, the mask token included
        if mask_token_id is not None:
            probs[..., mask_token_id] = 0.0  # ... but it is never chosen
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
    if mask_token_id is not None:
        draw = flat.clone()
        draw[:, mask_token_id] = 0.0
        # Where top-p kept the mask token alone, draw from the unfiltered distribution instead.
        only_mask = draw.sum(dim=-1) == 0
        if only_mask.any():
            full = torch.softmax(logits.reshape(-1, logits.shape[-1])[only_mask] / temperature, dim=-1)
            full[:, mask_token_id] = 0.0
            draw[only_mask] = full
        flat = draw
    tokens = torch.multinomial(flat, 1, generator=generator).reshape(probs.shape[:-1])
    conf = probs.gather(-1, tokens.unsqueeze(-1)).squeeze(-1)
    return tokens, conf
