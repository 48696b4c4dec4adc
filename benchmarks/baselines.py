"""What the diffusion decoder's throughput is compared with, measured on the same device and model.

* The weights-stream floor: the time to read every weight once. A decode forward at small batch
  must read all of them, so `ms per forward / floor` says how far a forward is from the memory
  bound of the card.
* The autoregressive baseline: the same shape and weights decoded token by token by transformers'
  own `generate` (greedy, a static cache, which transformers compiles on CUDA), the alternative a
  user of the checkpoint has.
"""

from __future__ import annotations

import time
from enum import Enum

import torch
import transformers
from transformers import GenerationConfig


class ArMode(str, Enum):
    """--ar: `static` (static cache; transformers compiles the forward on CUDA), `eager` (dynamic cache, no
    compile: for CPU smoke runs), `off`."""

    STATIC = "static"
    EAGER = "eager"
    OFF = "off"


FLOOR_REDUCTIONS = {"sum": torch.sum, "amax": torch.amax}


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def weight_bytes(model) -> int:
    """Bytes of every parameter (embedding, layers, lm_head); a tied weight counts once, as
    `parameters()` yields a shared tensor once."""
    return sum(p.numel() * p.element_size() for p in model.parameters())


def weights_stream_floor(model, *, repeats: int = 5, warmup: int = 2) -> dict:
    """Time one large reduction over a flat buffer as big as all the weights: best of `repeats`
    after `warmup` runs, device synchronised; the fastest of a sum and an amax is the floor.
    The buffer is freed before returning."""
    first = next(model.parameters())
    device, dtype = first.device, first.dtype
    nbytes = weight_bytes(model)
    buf = torch.ones(nbytes // first.element_size(), dtype=dtype, device=device)
    timings = {}
    try:
        for name, reduce in FLOOR_REDUCTIONS.items():
            for _ in range(warmup):
                reduce(buf)
            best = float("inf")
            for _ in range(repeats):
                _sync(device)
                t0 = time.perf_counter()
                reduce(buf)
                _sync(device)
                best = min(best, time.perf_counter() - t0)
            timings[name] = best
    finally:
        del buf
        if device.type == "cuda":
            torch.cuda.empty_cache()
    name = min(timings, key=timings.get)
    seconds = timings[name]
    return {"bytes": nbytes, "gigabytes": round(nbytes / 1e9, 3), "dtype": str(dtype).replace("torch.", ""),
            "ms": round(1000 * seconds, 4), "gb_per_second": round(nbytes / seconds / 1e9, 1), "reduction": name,
            "ms_by_reduction": {k: round(1000 * v, 4) for k, v in timings.items()}, "repeats": repeats,
            "warmup": warmup}


def autoregressive_config(model, new_tokens: int, mode: ArMode) -> GenerationConfig:
    """Greedy, exactly `new_tokens` tokens per row (min = max, so a stop token cannot end a row early)."""
    gc = model.generation_config
    return GenerationConfig(max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False,
                            cache_implementation="static" if mode is ArMode.STATIC else None,
                            eos_token_id=gc.eos_token_id, pad_token_id=gc.pad_token_id)


@torch.no_grad()
def autoregressive_generate(model, ids: torch.Tensor, mask: torch.Tensor, new_tokens: int, mode: ArMode):
    """Token-by-token decoding with transformers' own `generate`; returns (new tokens, wall seconds).

    The benchmark model's class puts `BlockDiffusionGenerationMixin` in front of `Qwen2ForCausalLM`, so
    `model.generate` is block diffusion. `transformers.GenerationMixin.generate` called with the model
    as `self` is the stock token-by-token loop on the very same module and weights: nothing is patched
    and no second model (with its own rotary buffers and config) has to be kept in sync."""
    config = autoregressive_config(model, new_tokens, mode)
    _sync(ids.device)
    t0 = time.perf_counter()
    out = transformers.GenerationMixin.generate(model, input_ids=ids, attention_mask=mask, generation_config=config)
    _sync(ids.device)
    wall = time.perf_counter() - t0
    new = out[:, ids.shape[1]:]
    if new.shape[1] != new_tokens:
        raise RuntimeError(f"autoregressive generate returned {new.shape[1]} new tokens per row, expected {new_tokens}")
    return new.cpu(), wall


def autoregressive_run(model, ids: torch.Tensor, mask: torch.Tensor, new_tokens: int, mode: ArMode,
                       repeats: int = 1) -> dict:
    """One untimed warm-up call (on CUDA with a static cache: transformers compiles here), then timed calls."""
    t0 = time.perf_counter()
    autoregressive_generate(model, ids, mask, new_tokens, mode)
    warm = time.perf_counter() - t0
    walls = [autoregressive_generate(model, ids, mask, new_tokens, mode)[1] for _ in range(max(1, repeats))]
    wall = sorted(walls)[len(walls) // 2]
    batch = ids.shape[0]
    return {"batch": batch, "path": f"ar-{mode.value}", "cache_implementation": "static" if mode is ArMode.STATIC else "dynamic",
            "wall_seconds": round(wall, 4), "walls": [round(w, 4) for w in walls], "warmup_seconds": round(warm, 2),
            "generated_tokens": batch * new_tokens, "forwards": new_tokens,
            "tokens_per_second": round(batch * new_tokens / wall, 2), "ms_per_token": round(1000 * wall / new_tokens, 3)}
