"""Block-diffusion training (Fast-dLLM v2 objective) for transformers' causal-LM classes."""

from .collator import BlockDiffusionCollator, TrainingDataError
from .objective import block_diffusion_attention, block_diffusion_labels, block_diffusion_loss
from .trainer import (
    BlockDiffusionTrainer,
    prepare_for_block_diffusion,
    tokenize_chat_example,
    validate_training_setup,
)

__all__ = [
    "BlockDiffusionCollator",
    "BlockDiffusionTrainer",
    "TrainingDataError",
    "block_diffusion_attention",
    "block_diffusion_labels",
    "block_diffusion_loss",
    "prepare_for_block_diffusion",
    "tokenize_chat_example",
    "validate_training_setup",
]
