"""Tiny random checkpoints in the Fast_dLLM hub format, for tests, smoke runs and benchmarks.

The config starts from the real Fast_dLLM_v2_7B config.json (when given) and is scaled down;
the saved folder has the hub layout (`model_type: Fast_dLLM_Qwen`, `bd_size`, `auto_map`) so it
goes through exactly the loading path a user's download does.
"""

from __future__ import annotations

import json
import os
import shutil

import torch
from transformers.models.qwen2 import Qwen2Config, Qwen2ForCausalLM

from .hub_format import HUB_IDENTITY

TOKENIZER_FILES = (
    "vocab.json",
    "merges.txt",
    "tokenizer_config.json",
    "added_tokens.json",
    "special_tokens_map.json",
    "chat_template.jinja",
)

_DEFAULT_HUB_CONFIG = {
    **HUB_IDENTITY,
    "bd_size": 32,
    "hidden_act": "silu",
    "rms_norm_eps": 1e-6,
    "rope_theta": 1000000.0,
    "tie_word_embeddings": False,
    "use_sliding_window": False,
    "max_position_embeddings": 32768,
    "bos_token_id": 151643,
    "eos_token_id": 151645,
    "pad_token_id": 151645,
}


def make_tiny_checkpoint(
    path: str,
    *,
    hub_config_path: str | None = None,
    num_layers: int = 4,
    hidden_size: int = 64,
    intermediate_size: int = 128,
    num_heads: int = 4,
    num_kv_heads: int = 2,
    vocab_size: int = 512,
    max_position_embeddings: int = 1024,
    mask_token_id: int | None = None,
    eos_token_id: int | None = None,
    tokenizer_dir: str | None = None,
    seed: int = 0,
    init_std: float = 0.5,
    dtype: str = "float32",
) -> str:
    """Write a random Fast_dLLM-format checkpoint to `path` and return `path`.

    Without a tokenizer the mask id is stored in config.json as `mask_token_id` (default: the last
    vocabulary id). With `tokenizer_dir` the tokenizer files are copied in and `vocab_size` is
    raised to cover every tokenizer id. A large `init_std` makes random logits peaky enough that
    different inputs give different tokens (so tests can see differences).
    """
    hub = dict(_DEFAULT_HUB_CONFIG)
    if hub_config_path is not None:
        with open(hub_config_path, encoding="utf-8") as f:
            hub = json.load(f)
    if tokenizer_dir is not None:
        vocab_size = max(vocab_size, 151680)
    hub.update(
        num_hidden_layers=num_layers,
        hidden_size=hidden_size,
        intermediate_size=intermediate_size,
        num_attention_heads=num_heads,
        num_key_value_heads=num_kv_heads,
        vocab_size=vocab_size,
        max_position_embeddings=max_position_embeddings,
        max_window_layers=num_layers,
        layer_types=["full_attention"] * num_layers,
        torch_dtype=dtype,
    )
    if tokenizer_dir is None:
        hub["mask_token_id"] = vocab_size - 1 if mask_token_id is None else mask_token_id
        hub["eos_token_id"] = vocab_size - 2 if eos_token_id is None else eos_token_id
        hub["pad_token_id"] = vocab_size - 3
        hub["bos_token_id"] = vocab_size - 3
    elif mask_token_id is not None:
        hub["mask_token_id"] = mask_token_id

    qwen_keys = {k: v for k, v in hub.items() if k not in ("auto_map", "architectures", "model_type")}
    qwen_keys["torch_dtype"] = None
    config = Qwen2Config(**qwen_keys)
    torch.manual_seed(seed)
    model = Qwen2ForCausalLM(config)
    init_random_weights(model, std=init_std)
    os.makedirs(path, exist_ok=True)
    model.to(getattr(torch, dtype)).save_pretrained(path, safe_serialization=True)
    # Replace transformers' config with the hub-format one: this is what the Hub serves.
    with open(os.path.join(path, "config.json"), "w", encoding="utf-8") as f:
        json.dump(hub, f, indent=2)
    gen_cfg = os.path.join(path, "generation_config.json")
    if os.path.exists(gen_cfg):
        os.remove(gen_cfg)
    if tokenizer_dir is not None:
        for name in TOKENIZER_FILES:
            src = os.path.join(tokenizer_dir, name)
            if os.path.exists(src):
                shutil.copy(src, os.path.join(path, name))
    return path


def init_random_weights(model, *, std: float, fan_in_scaled: bool = True,
                        generator: torch.Generator | None = None) -> None:
    """Normal random weights in place; every norm weight is 1.

    `fan_in_scaled` (what tests use): embeddings and lm_head get `std`, every other matrix
    `4 * std / sqrt(fan_in)`, so with std 0.5 logits are peaky and decisions robust to rounding.
    Otherwise every matrix gets `std` (the benchmark's 0.02: realistic magnitudes, flat logits).
    """
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "norm" in name:
                param.fill_(1.0)
            elif fan_in_scaled and not ("embed" in name or "lm_head" in name):
                param.normal_(0.0, std / (param.shape[-1] ** 0.5) * 4, generator=generator)
            else:
                param.normal_(0.0, std, generator=generator)


def random_prompts(lengths, high: int, *, seed: int = 0) -> list[list[int]]:
    """Random token-id prompts of the given lengths with ids in [0, high) (keep specials above)."""
    gen = torch.Generator().manual_seed(seed)
    return [torch.randint(0, high, (int(n),), generator=gen).tolist() for n in lengths]
