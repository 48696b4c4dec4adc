"""Which engine runs a `generate` call, chosen before any compute.

`fast_path` (a `GenerationConfig` field, validated with the others in `config.py`):

* `None` / `True` (default): the graphed engine with CUDA graphs and `torch.compile` where it can
  serve the call, else the eager engine, with the reason logged and reported in
  `stats["fast_path"]`. A process's first call compiles (seconds to tens of seconds); a compile
  failure falls back to uncompiled graphs (logged). `"graphs"` starts in seconds and gives the eager
  engine's tokens exactly in bf16 too, at more time per forward (docs/benchmarks.md has the numbers);
* `False`: the eager engine;
* `"graphs"`, `"compile"`, `"uncaptured"`: the graphed engine (captured, captured with
  `torch.compile`, or its passes run without capture, on any device). An explicit request the
  graphed engine cannot serve (a CPU device for graphs, sampling, an unsupported layer) is an
  error, not a silent fallback.
"""

from __future__ import annotations

import logging
import weakref

import torch

from ..config import FastPath
from .base import Engine
from .eager import EagerEngine
from .graphed import GraphedEngine
from .static_store import MAX_STOP_IDS

logger = logging.getLogger(__name__)
_FALLBACKS_LOGGED: set[str] = set()


# One graphed engine per model: its static buffers and graphs serve every later call of that model.
_GRAPHED: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


def unsupported_reason(runner, settings, mode: FastPath) -> str | None:
    """Why the graphed engine cannot serve this call in `mode` (None: it can)."""
    if runner.device.type != "cuda" and mode is not FastPath.UNCAPTURED:
        return f"device is {runner.device.type}, not CUDA"
    if settings.do_sample:
        return "sampling (do_sample=True): the graphed engine covers greedy decoding"
    if len(settings.eos_token_ids) > MAX_STOP_IDS:
        return f"more than {MAX_STOP_IDS} stop token ids"
    return unsupported_layer_reason(runner)


def unsupported_layer_reason(runner) -> str | None:
    """The graphed engine calls the layers' own modules, but packs attention itself: it serves
    Qwen2/Llama layers with SDPA/eager attention, default RoPE, gated MLPs and RMSNorms."""
    cfg = runner.model.config
    impl = getattr(cfg, "_attn_implementation", "sdpa") or "sdpa"
    if impl not in ("sdpa", "eager"):
        return f"attention implementation {impl!r} (the graphed engine computes SDPA attention; sdpa/eager models only)"
    if getattr(cfg, "use_sliding_window", False) and getattr(cfg, "sliding_window", None):
        return "sliding-window attention"
    rope = getattr(runner.rotary, "rope_type", "default")
    if rope != "default" or getattr(runner.rotary, "attention_scaling", 1.0) != 1.0:
        return f"rope type {rope!r} (default RoPE only)"
    for i, layer in enumerate(runner.layers):
        if type(layer).__name__ not in ("Qwen2DecoderLayer", "LlamaDecoderLayer"):
            return f"decoder layer type {type(layer).__name__} (Qwen2/Llama layers only)"
        attn = getattr(layer, "self_attn", None)
        if not all(hasattr(attn, n) for n in ("q_proj", "k_proj", "v_proj", "o_proj", "head_dim", "scaling")):
            return f"layer {i} attention ({type(attn).__name__}) is not a q/k/v/o projection attention"
        if getattr(attn, "sliding_window", None):
            return f"layer {i} attention has a sliding window"
    return None


def select_engine(model, runner, settings, *, batch: int, capacity: int,
                  generator: torch.Generator | None = None) -> tuple[Engine, str | None]:
    """(engine, why the graphed engine is not used or None)."""
    requested = settings.fast_path
    if requested is False:
        return EagerEngine(runner, settings, generator=generator), "off (fast_path=False)"
    explicit = requested not in (None, True)
    mode = FastPath(requested) if explicit else FastPath.COMPILE
    reason = unsupported_reason(runner, settings, mode)
    if reason is not None:
        if explicit:
            raise ValueError(f"fast_path={requested!r} cannot serve this call: {reason} "
                             "(use fast_path=None to fall back to the eager engine where needed, or False)")
        if reason not in _FALLBACKS_LOGGED:  # once per process and reason, not once per batch
            _FALLBACKS_LOGGED.add(reason)
            logger.info("fast path not used: %s", reason)
        return EagerEngine(runner, settings, generator=generator), f"off ({reason})"
    capture = mode is not FastPath.UNCAPTURED
    compile_layers = mode is FastPath.COMPILE
    engine = _GRAPHED.get(model)
    if engine is None or engine.capture != capture or engine.compile_layers != compile_layers:
        engine = GraphedEngine(runner, settings, capture=capture, compile_layers=compile_layers)
        _GRAPHED[model] = engine
    engine.bind(runner, settings, generator)
    try:
        engine.prepare(batch, capacity)
    except torch.OutOfMemoryError as err:
        engine.reset()
        if explicit:
            raise ValueError(f"fast_path={requested!r}: static buffers do not fit in device memory: {err}") from err
        logger.warning("fast path not used: static buffers do not fit: %s", err)
        return EagerEngine(runner, settings, generator=generator), "off (static buffers do not fit in device memory)"
    return engine, None


def graphed_engine_of(model) -> GraphedEngine | None:
    """The graphed engine held for `model`, if any (its buffers and graphs)."""
    return _GRAPHED.get(model)


def release(model) -> None:
    """Free the graphed engine's static buffers and graphs held for `model`."""
    engine = _GRAPHED.pop(model, None)
    if engine is not None:
        engine.reset()
