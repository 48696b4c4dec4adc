"""Batches for the block-diffusion objective: padding to whole blocks and complementary masks.

Each example comes in as `input_ids` (prompt + answer + stop token) and `prompt_length`. The
collator pads to whole blocks with the pad token, scores the answer and the pad slots of the block
that holds the stop token (the decoder fills those slots too, so the model learns to close a block
at once), draws one mask ratio per block, and emits every example twice: with mask m and with its
complement, so each answer token is supervised in every step.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .objective import block_diffusion_labels


class TrainingDataError(ValueError):
    """A training example cannot be used; the message names the example and the field."""


@dataclass
class BlockDiffusionCollator:
    """Turns `{"input_ids", "prompt_length"}` examples into `{"clean", "noisy", "labels"}` tensors."""

    block_size: int
    mask_token_id: int
    pad_token_id: int
    complementary: bool = True
    generator: torch.Generator | None = None

    def __call__(self, examples: list[dict]) -> dict[str, torch.Tensor]:
        for index, example in enumerate(examples):
            check_example(example, index, self.mask_token_id)
        bs = self.block_size
        longest = max(len(e["input_ids"]) for e in examples)
        length = -(-longest // bs) * bs
        batch = len(examples)
        clean = torch.full((batch, length), self.pad_token_id, dtype=torch.long)
        scored = torch.zeros((batch, length), dtype=torch.bool)
        for row, example in enumerate(examples):
            ids = example["input_ids"]
            clean[row, : len(ids)] = torch.as_tensor(ids, dtype=torch.long)
            # The answer, the stop token and the rest of the stop token's block.
            end = -(-len(ids) // bs) * bs
            scored[row, example["prompt_length"]: end] = True
        slot = torch.arange(length)
        maskable = scored & (slot % bs != 0)[None]
        ratio = torch.rand((batch, length // bs), generator=self.generator).repeat_interleave(bs, dim=1)
        noised = maskable & (torch.rand((batch, length), generator=self.generator) < ratio)
        if self.complementary:
            clean, scored = clean.repeat(2, 1), scored.repeat(2, 1)
            noised = torch.cat([noised, maskable & ~noised])
        noisy = torch.where(noised, self.mask_token_id, clean)
        labels = block_diffusion_labels(clean, noised, scored, bs)
        return {"clean": clean, "noisy": noisy, "labels": labels}


def check_example(example: dict, index: int, mask_token_id: int) -> None:
    """Reject an example the objective cannot use, before it reaches the model."""
    ids, prompt_length = example.get("input_ids"), example.get("prompt_length")
    if ids is None or prompt_length is None:
        raise TrainingDataError(f"example {index}: needs fields 'input_ids' and 'prompt_length', got {sorted(example)}")
    if not 0 <= prompt_length < len(ids):
        raise TrainingDataError(
            f"example {index}: no answer span (prompt_length={prompt_length}, {len(ids)} tokens; allowed: "
            "0 <= prompt_length < len(input_ids))"
        )
    if mask_token_id in ids:
        raise TrainingDataError(f"example {index}: input_ids contain the mask token id {mask_token_id}")
