"""Shared fixtures: tiny random Fast_dLLM-format checkpoints, built once per session, offline."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"
HUB_CONFIG = SHARED_DATA / "fast_dllm_v2_7b" / "config.json"
TOKENIZER_DIR = SHARED_DATA / "qwen2_tokenizer"

class NetworkAttempted(RuntimeError):
    pass


def _refuse_network(*args, **kwargs):
    raise NetworkAttempted(f"network access attempted: {args!r}")


@pytest.fixture(scope="module")
def no_network():
    """Refuse every outbound connection (use with `pytestmark = pytest.mark.usefixtures("no_network")`)."""
    import socket

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(socket.socket, "connect", _refuse_network)
        patch.setattr(socket.socket, "connect_ex", _refuse_network)
        patch.setattr(socket, "create_connection", _refuse_network)
        patch.setattr(socket, "getaddrinfo", _refuse_network)
        yield


TINY_VOCAB = 512
TINY_MASK = TINY_VOCAB - 1


def _hub_config():
    return str(HUB_CONFIG) if HUB_CONFIG.exists() else None


@pytest.fixture(scope="session")
def tiny_path(tmp_path_factory) -> str:
    """4-layer checkpoint, vocab 512 (mask 511), no tokenizer: fast id-level tests."""
    from dllm_generation.testing import make_tiny_checkpoint

    return make_tiny_checkpoint(str(tmp_path_factory.mktemp("tiny")), hub_config_path=_hub_config(),
                                num_layers=4, vocab_size=TINY_VOCAB)


@pytest.fixture(scope="session")
def tiny_model(tiny_path):
    from dllm_generation import load_model

    torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))
    model, tok = load_model(tiny_path, dtype=torch.float32)
    assert tok is None
    return model


@pytest.fixture(scope="session")
def tokenizer_path(tmp_path_factory) -> str:
    """2-layer checkpoint with the real Qwen2.5 tokenizer (|<MASK>| and chat template)."""
    if not TOKENIZER_DIR.exists():
        pytest.skip(f"shared tokenizer not found at {TOKENIZER_DIR}")
    from dllm_generation.testing import make_tiny_checkpoint

    return make_tiny_checkpoint(str(tmp_path_factory.mktemp("tiny_tok")), hub_config_path=_hub_config(),
                                num_layers=2, hidden_size=32, intermediate_size=64, tokenizer_dir=str(TOKENIZER_DIR))


@pytest.fixture(scope="session")
def eval_checkpoint(tmp_path_factory) -> str:
    """2-layer checkpoint (hidden 64) with the real tokenizer, for the eval pipeline's end-to-end tests."""
    if not TOKENIZER_DIR.exists():
        pytest.skip(f"shared tokenizer not found at {TOKENIZER_DIR}")
    from dllm_generation.testing import make_tiny_checkpoint

    path = tmp_path_factory.mktemp("eval_tiny") / "ckpt"
    return make_tiny_checkpoint(str(path), tokenizer_dir=str(TOKENIZER_DIR), num_layers=2)


def pad_batch(prompts: list[list[int]], side: str = "left", pad_id: int = 0):
    """HF-style padded input_ids + attention_mask."""
    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, p in enumerate(prompts):
        sl = slice(width - len(p), width) if side == "left" else slice(0, len(p))
        ids[i, sl] = torch.tensor(p)
        mask[i, sl] = 1
    return ids, mask


def generate_new_tokens(model, prompts, *, side="left", **gen_kwargs):
    """New tokens per row (list of lists, trailing pad kept) and the stats dict."""
    from transformers import GenerationConfig

    ids, mask = pad_batch(prompts, side)
    cfg = GenerationConfig(**gen_kwargs)
    out = model.generate(input_ids=ids, attention_mask=mask, generation_config=cfg, return_dict_in_generate=True)
    return out.sequences[:, ids.shape[1]:].tolist(), out.stats
