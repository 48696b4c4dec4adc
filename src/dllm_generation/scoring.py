"""Loglikelihood of continuations with one masked forward (how Fast-dLLM v2 scores MMLU and GPQA).

One block-causal forward over context + continuation scores continuation tokens at their masked
positions (token shift: position i-1 predicts token i). Two variants:

- ``"reference"`` (Fast-dLLM v2's ``eval.py``): only the *first* continuation token is replaced by
  a mask and scored; the rest of the continuation stays as it is, and the sequence is followed by
  EOS and mask tokens up to the end of its block (a whole extra block when it ends on a boundary).
  Every slot is visible inside its block, so the scored position sees them. This is what the
  published numbers measured.
- ``"masked_continuation"``: every continuation token is masked and scored, and the slots after the
  sequence are hidden. The sum then covers the whole continuation, which matters for answers
  longer than one token; it exists for that, and does not reproduce the published numbers.
"""

from __future__ import annotations

import time

import torch

from .cache import BlockDiffusionCache
from .decoding import DecodeStats
from .generation import check_token_ids
from .runner import LayerStackRunner

FORWARDS = ("reference", "masked_continuation")


@torch.no_grad()
def loglikelihood(model, contexts: list[list[int]], continuations: list[list[int]], *, batch_size: int = 8,
                  mask_token_id: int | None = None, block_size: int | None = None, forward: str = "reference",
                  eos_token_id: int | None = None):
    """Log-probability of each continuation given its context (`forward` picks what is scored, see the
    module doc); returns (scores, stats dict). Rows of a batch do not see each other."""
    if forward not in FORWARDS:
        raise ValueError(f"forward={forward!r} is not allowed (allowed: {', '.join(FORWARDS)})")
    if len(contexts) != len(continuations):
        raise ValueError(f"contexts ({len(contexts)}) and continuations ({len(continuations)}) differ in length")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    mask_id = mask_token_id if mask_token_id is not None else getattr(model.generation_config, "mask_token_id", None)
    if mask_id is None:
        raise ValueError("mask_token_id is not set on the model's generation_config; pass mask_token_id=")
    bs = block_size or getattr(model.generation_config, "block_size", None) or getattr(model.config, "bd_size", 32)
    for i, (c, x) in enumerate(zip(contexts, continuations)):
        if not c or not x:
            raise ValueError(f"pair {i}: context and continuation must both be non-empty")
    runner = LayerStackRunner(model)
    check_token_ids(contexts, runner.embed.num_embeddings, "contexts")
    check_token_ids(continuations, runner.embed.num_embeddings, "continuations")
    stats = DecodeStats()
    processed = 0
    start = time.perf_counter()
    scores: list[float] = []
    dev = runner.device
    pad_id = model.generation_config.pad_token_id if model.generation_config.pad_token_id is not None else mask_id
    if forward == "reference":
        eos = eos_token_id if eos_token_id is not None else model.generation_config.eos_token_id
        eos = eos[0] if isinstance(eos, (list, tuple)) else eos
        if eos is None:
            raise ValueError("the reference forward appends EOS: set eos_token_id on the model's generation_config")
    scored_tokens = 0
    for lo in range(0, len(contexts), batch_size):
        pairs = list(zip(contexts[lo:lo + batch_size], continuations[lo:lo + batch_size]))
        if forward == "reference":
            seqs = [_reference_sequence(c, x, mask_id, eos, bs) for c, x in pairs]
            scored = [1] * len(pairs)
        else:
            seqs = [c + [mask_id] * len(x) for c, x in pairs]
            scored = [len(x) for _, x in pairs]
        n_blocks = [-(-len(q) // bs) for q in seqs]
        width = max(n_blocks) * bs
        # Right-align on block boundaries: each row's first token starts a block.
        pad = torch.tensor([width - nb * bs for nb in n_blocks], device=dev)
        tokens = torch.full((len(seqs), width), pad_id, dtype=torch.long, device=dev)
        for r, q in enumerate(seqs):
            tokens[r, pad[r]: pad[r] + len(q)] = torch.tensor(q, device=dev)
        slots = torch.arange(width, device=dev)
        rel = slots[None, :] - pad[:, None]
        # Block-causal over each row's own blocks; trailing pad slots of the last block are keys
        # nobody needs, so they are hidden too.
        lengths = torch.tensor([len(q) for q in seqs], device=dev)
        key_ok = (rel >= 0) & (rel < lengths[:, None])
        allowed = ((slots[None, :] // bs) <= (slots[:, None] // bs))[None] & key_ok[:, None, :]
        allowed = (allowed | torch.eye(width, dtype=torch.bool, device=dev)[None])[:, None]
        cache = BlockDiffusionCache(runner.num_layers, len(seqs), width, bs)
        cache.begin_forward("append", rows=None, row_index=torch.arange(len(seqs), device=dev))
        hidden = runner.hidden_states(tokens, rel.clamp(min=0), allowed, cache)
        processed += sum(len(q) for q in seqs)
        stats.forwards += 1
        for r, ((c, x), n) in enumerate(zip(pairs, scored)):
            first = int(pad[r]) + len(c)
            h = hidden[r, first - 1: first - 1 + n]
            logp = torch.log_softmax(runner.logits(h), dim=-1)
            scores.append(float(logp.gather(-1, torch.tensor(x[:n], device=dev)[:, None]).sum()))
            scored_tokens += n
    stats.layer_runs = list(runner.layer_runs)
    stats.layer_skips = list(runner.layer_skips)
    stats.wall_seconds = time.perf_counter() - start
    out = stats.as_dict()
    out["scored_tokens"] = scored_tokens
    out["processed_tokens"] = processed
    return scores, out


def _reference_sequence(context: list[int], continuation: list[int], mask_id: int, eos_id: int, block_size: int):
    """context, mask, continuation[1:], EOS, masks to the end of the block (eval.py's `_forward_process`)."""
    seq = context + [mask_id] + continuation[1:]
    fill = block_size - len(seq) % block_size
    return seq + [eos_id] + [mask_id] * (fill - 1)
