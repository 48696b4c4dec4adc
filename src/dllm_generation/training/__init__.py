"""Block-diffusion training (Fast-dLLM v2 objective) for transformers' causal-LM classes.

The objective, the collator and the example builder need only torch; the `Trainer` glue (which
needs `accelerate`, as transformers' `Trainer` does) is imported on first use.
"""

from .collator import BlockDiffusionCollator, TrainingDataError
from .examples import tokenize_chat_example
from .objective import block_diffusion_attention, block_diffusion_labels, block_diffusion_loss

_TRAINER_NAMES = ("BlockDiffusionTrainer", "prepare_for_block_diffusion", "validate_training_setup")

__all__ = [
    "BlockDiffusionCollator",
    "TrainingDataError",
    "block_diffusion_attention",
    "block_diffusion_labels",
    "block_diffusion_loss",
    "tokenize_chat_example",
    *_TRAINER_NAMES,
]


def __getattr__(name):
    if name in _TRAINER_NAMES:
        from . import trainer

        return getattr(trainer, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
