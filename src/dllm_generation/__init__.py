"""Block-diffusion (Fast-dLLM v2) decoding with layer reuse, native to Hugging Face transformers."""

from .cache import BlockDiffusionCache
from .config import DiffusionSettings, LayerReuseConfig
from .generation import BlockDiffusionGenerateOutput, BlockDiffusionGenerationMixin
from .loading import (
    BlockDiffusionLlamaForCausalLM,
    BlockDiffusionQwen2ForCausalLM,
    attach_block_diffusion,
    load_model,
)

__all__ = [
    "BlockDiffusionCache",
    "BlockDiffusionGenerateOutput",
    "BlockDiffusionGenerationMixin",
    "BlockDiffusionLlamaForCausalLM",
    "BlockDiffusionQwen2ForCausalLM",
    "DiffusionSettings",
    "LayerReuseConfig",
    "attach_block_diffusion",
    "load_model",
]
__version__ = "0.1.0"
