"""Loglikelihood of continuations with one masked forward (how Fast-dLLM v2 scores MMLU).

The context is followed by the continuation replaced with mask tokens; one block-causal forward
over the whole sequence scores each continuation token at its (shifted) masked position.
"""

from __future__ import annotations

import time

import torch

from .cache import BlockDiffusionCache
from .decoding import DecodeStats
from .generation import check_token_ids
from .runner import LayerStackRunner


@torch.no_grad()
def loglikelihood(model, contexts: list[list[int]], continuations: list[list[int]], *, batch_size: int = 8,
                  mask_token_id: int | None = None, block_size: int | None = None):
    """Summed log-probability of each continuation given its context; returns (scores, stats dict)."""
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
    start = time.perf_counter()
    scores: list[float] = []
    dev = runner.device
    pad_id = model.generation_config.pad_token_id if model.generation_config.pad_token_id is not None else mask_id
    for lo in range(0, len(contexts), batch_size):
        seqs = [c + [mask_id] * len(x) for c, x in zip(contexts[lo:lo + batch_size], continuations[lo:lo + batch_size])]
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
        stats.forwards += 1
        for r, (c, x) in enumerate(zip(contexts[lo:lo + batch_size], continuations[lo:lo + batch_size])):
            first = int(pad[r]) + len(c)
            h = hidden[r, first - 1: first - 1 + len(x)]
            logp = torch.log_softmax(runner.logits(h), dim=-1)
            scores.append(float(logp.gather(-1, torch.tensor(x, device=dev)[:, None]).sum()))
    stats.layer_runs = list(runner.layer_runs)
    stats.layer_skips = list(runner.layer_skips)
    stats.wall_seconds = time.perf_counter() - start
    out = stats.as_dict()
    out["scored_tokens"] = sum(len(x) for x in continuations)
    return scores, out
