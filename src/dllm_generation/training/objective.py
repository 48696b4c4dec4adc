"""The Fast-dLLM v2 block-diffusion training objective, for transformers' own causal-LM classes.

One training row is a clean sequence `x` (prompt + answer, padded to whole blocks of `bd_size`)
and a noisy copy `x_t` in which some answer tokens of each block are replaced by the mask token.
The model sees `[x_t ; x]` (length 2L) with both halves at positions 0..L-1 and this pattern:

    noisy block b  ->  itself (bidirectional)  +  clean blocks < b
    clean block b  ->  clean blocks <= b  (block-causal, bidirectional inside the block)

That is exactly what the decoder does at inference: a block being denoised sees itself and the
committed prefix; prefill and commit run the clean pattern. Predictions are shifted, as the
decoder reads them: the logits at position i predict token i+1. So

* a masked token j of a noisy block is predicted at noisy position j-1 (same block: the first slot
  of a block is never masked, because the decoder always knows it), and
* the first token of block b is predicted at the last clean position of block b-1, which is how the
  decoder chooses the first token of the next block after a commit (or of the first block after
  prefill).

The loss is the mean cross-entropy over those targets; prompt tokens are never masked or scored.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

IGNORE_INDEX = -100


def block_diffusion_attention(length: int, block_size: int, device=None) -> torch.Tensor:
    """[2L, 2L] boolean pattern (True = may attend) for `[noisy ; clean]` of `length` L each."""
    block = torch.arange(length, device=device) // block_size
    same = block[:, None] == block[None, :]
    earlier = block[None, :] < block[:, None]
    upto = block[None, :] <= block[:, None]
    top = torch.cat([same, earlier], dim=1)
    bottom = torch.cat([torch.zeros_like(same), upto], dim=1)
    return torch.cat([top, bottom], dim=0)


def block_diffusion_labels(clean: torch.Tensor, noised: torch.Tensor, scored: torch.Tensor,
                           block_size: int) -> torch.Tensor:
    """Shifted targets [B, 2L] for `[noisy ; clean]`; IGNORE_INDEX where nothing is predicted.

    `noised` marks the tokens replaced by the mask in the noisy half; `scored` marks the answer
    tokens (the first token of each answer block is scored through the clean half).
    """
    batch, length = clean.shape
    labels = torch.full((batch, 2 * length), IGNORE_INDEX, dtype=torch.long, device=clean.device)
    noisy_targets = torch.where(noised, clean, IGNORE_INDEX)
    labels[:, : length - 1] = noisy_targets[:, 1:]
    block_first = torch.zeros_like(scored)
    block_first[:, block_size::block_size] = True
    clean_targets = torch.where(block_first & scored, clean, IGNORE_INDEX)
    labels[:, length: 2 * length - 1] = clean_targets[:, 1:]
    return labels


def block_diffusion_loss(model, clean: torch.Tensor, noisy: torch.Tensor, labels: torch.Tensor,
                         block_size: int) -> torch.Tensor:
    """Mean cross-entropy of `model` on `[noisy ; clean]` with the block-diffusion pattern."""
    batch, length = clean.shape
    if length % block_size:
        raise ValueError(f"sequence length {length} is not a multiple of block_size={block_size}")
    tokens = torch.cat([noisy, clean], dim=1)
    positions = torch.arange(length, device=clean.device).repeat(2)[None].expand(batch, -1)
    pattern = block_diffusion_attention(length, block_size, clean.device)
    mask = pattern[None, None].expand(batch, 1, -1, -1)
    logits = model(input_ids=tokens, attention_mask=mask, position_ids=positions, use_cache=False).logits
    return F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), labels.reshape(-1),
                           ignore_index=IGNORE_INDEX)
