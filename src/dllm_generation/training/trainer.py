"""HF `Trainer` glue for block-diffusion training, and the checks that run before the first step.

`BlockDiffusionTrainer` is a plain `transformers.Trainer` whose loss is the block-diffusion
objective, so checkpoints, `resume_from_checkpoint`, logging, the progress bar and accelerate's
multi-GPU launch all work as users of `Trainer` expect. `prepare_for_block_diffusion` turns an
autoregressive Qwen2/Llama checkpoint into a starting point (mask token, `bd_size`), the way
Fast-dLLM v2 was made from Qwen2.5.
"""

from __future__ import annotations

import logging

from transformers import Trainer

from ..loading import MASK_TOKEN, mask_token_id_from_tokenizer
from .collator import TrainingDataError, check_example
from .objective import block_diffusion_loss

logger = logging.getLogger(__name__)


class BlockDiffusionTrainer(Trainer):
    """`Trainer` with the block-diffusion loss; use it with `BlockDiffusionCollator`."""

    def __init__(self, *args, block_size: int, **kwargs):
        super().__init__(*args, **kwargs)
        self.block_size = block_size

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        loss = block_diffusion_loss(model, inputs["clean"], inputs["noisy"], inputs["labels"], self.block_size)
        return (loss, None) if return_outputs else loss


def prepare_for_block_diffusion(model, tokenizer, block_size: int):
    """Give an autoregressive checkpoint what block diffusion needs: a mask token and `bd_size`.

    Adds `|<MASK>|` to the tokenizer if it lacks one (growing the embeddings), and records the
    mask id and block size on the config, where `load_model` and `generate` read them.
    """
    if mask_token_id_from_tokenizer(tokenizer) is None:
        tokenizer.add_special_tokens({"additional_special_tokens": [MASK_TOKEN]})
        logger.info("added %s to the tokenizer", MASK_TOKEN)
    mask_id = mask_token_id_from_tokenizer(tokenizer)
    if mask_id >= model.get_input_embeddings().weight.shape[0]:
        model.resize_token_embeddings(len(tokenizer))
    model.config.mask_token_id = mask_id
    model.config.bd_size = block_size
    return model, tokenizer


def validate_training_setup(model, tokenizer, examples, block_size: int, mask_token_id: int) -> None:
    """Everything the first step would trip over, checked before it: raises ValueError naming the field."""
    if block_size < 2:
        raise ValueError(f"block_size={block_size} is too small (allowed: >= 2)")
    bd_size = getattr(model.config, "bd_size", None)
    if bd_size is not None and int(bd_size) != block_size:
        raise ValueError(f"block_size={block_size} disagrees with the model config's bd_size={bd_size} "
                         "(allowed: the same value, or a config without bd_size)")
    tokenizer_mask = mask_token_id_from_tokenizer(tokenizer)
    if tokenizer_mask is None:
        raise ValueError(f"the tokenizer has no {MASK_TOKEN} token (call prepare_for_block_diffusion first)")
    if tokenizer_mask != mask_token_id:
        raise ValueError(f"mask_token_id={mask_token_id} disagrees with the tokenizer's {MASK_TOKEN} id {tokenizer_mask}")
    config_mask = getattr(model.config, "mask_token_id", None)
    if config_mask is not None and int(config_mask) != mask_token_id:
        raise ValueError(f"mask_token_id={mask_token_id} disagrees with the model config's mask_token_id={config_mask}")
    vocab = model.get_input_embeddings().weight.shape[0]
    if mask_token_id >= vocab:
        raise ValueError(f"mask_token_id={mask_token_id} is outside the model's vocabulary of {vocab} ids")
    if tokenizer.eos_token_id is None or tokenizer.pad_token_id is None:
        raise ValueError("the tokenizer needs an eos token (the stop token) and a pad token")
    for index, example in enumerate(examples):
        check_example(example, index, mask_token_id)
        if max(example["input_ids"]) >= vocab:
            raise TrainingDataError(f"example {index}: token id {max(example['input_ids'])} is outside the "
                                    f"model's vocabulary of {vocab} ids")
