"""Block-diffusion (Fast-dLLM v2) decoding with layer reuse, native to Hugging Face transformers."""

from importlib.metadata import PackageNotFoundError, version

from .cache import BlockDiffusionCache
from .engines import release
from .generation import BlockDiffusionGenerateOutput, BlockDiffusionGenerationMixin
from .loading import (
    BlockDiffusionLlamaForCausalLM,
    BlockDiffusionQwen2ForCausalLM,
    attach_block_diffusion,
    load_model,
)
from .reuse import LayerReuseConfig
from .scoring import loglikelihood

__all__ = [
    "BlockDiffusionCache",
    "BlockDiffusionGenerateOutput",
    "BlockDiffusionGenerationMixin",
    "BlockDiffusionLlamaForCausalLM",
    "BlockDiffusionQwen2ForCausalLM",
    "LayerReuseConfig",
    "attach_block_diffusion",
    "load_model",
    "loglikelihood",
    "release",
]

try:
    __version__ = version("dllm_generation")  # one source: pyproject.toml, through the installed metadata
except PackageNotFoundError:  # imported from a source tree that was never installed
    __version__ = "0+unknown"
