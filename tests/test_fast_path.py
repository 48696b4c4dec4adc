"""Fast path (fast_path.py): same tokens, statistics and per-forward trace as the plain path.

On the CPU the fast path runs its static-shape code without CUDA graphs (`fast_path="eager"`);
in float32 it must reproduce the plain path token for token. By default on the CPU it is off,
with the reason reported (not an error).
"""

from __future__ import annotations

import pytest
import torch
from conftest import TINY_MASK, generate_new_tokens
from transformers import GenerationConfig

from dllm_generation import LayerReuseConfig
from dllm_generation.config import resolve_settings
from dllm_generation.decoding import BlockDiffusionDecoder, plan_layout
from dllm_generation.fast_path import _ENGINES, release, select_fast_path
from dllm_generation.runner import LayerStackRunner
from dllm_generation.testing import random_prompts

LENGTHS = [5, 31, 32, 33, 64, 70]
BASE = dict(block_size=32, small_block_size=8, threshold=0.9)
COUNTERS = ("forwards", "prefill_forwards", "commit_forwards", "block_forwards", "sub_block_forwards",
            "denoising_steps", "generated_tokens", "layer_calls", "layer_calls_skipped", "layer_runs", "layer_skips")


def prompts_of(lengths, seed=1):
    return random_prompts(lengths, TINY_MASK - 8, seed=seed)


def both_paths(model, prompts, **kw):
    plain, ps = generate_new_tokens(model, prompts, fast_path=False, **kw)
    fast, fs = generate_new_tokens(model, prompts, fast_path="eager", **kw)
    assert fs["fast_path"]["mode"] == "eager"
    assert ps["fast_path"] == "off (fast_path=False)"
    return plain, ps, fast, fs


REUSE = [None, LayerReuseConfig(k=1, subset="first", size=2), LayerReuseConfig(k=2, subset="middle", size=2),
         LayerReuseConfig(k=3, subset="last", size=2), LayerReuseConfig(k=2, subset="first", size=3, mode="residual")]


@pytest.mark.parametrize("use_block_cache", [True, False])
@pytest.mark.parametrize("reuse", REUSE, ids=lambda r: "none" if r is None else r.label)
def test_fast_path_equals_plain_path_tokens_and_stats(tiny_model, use_block_cache, reuse):
    prompts = prompts_of(LENGTHS)
    plain, ps, fast, fs = both_paths(tiny_model, prompts, max_new_tokens=72, use_block_cache=use_block_cache,
                                     layer_reuse=reuse, **BASE)
    assert fast == plain
    assert {k: fs[k] for k in COUNTERS} == {k: ps[k] for k in COUNTERS}
    if use_block_cache:
        assert fs["sub_block_forwards"] > 0 and fs["block_forwards"] > 0


@pytest.mark.parametrize("mode", ["output", "residual"])
def test_fast_path_equals_plain_when_rows_stop_in_different_blocks(tiny_model, mode):
    """Rows leaving the batch compact the static buffers (K/V and reuse entries) in place."""
    prompts = prompts_of(LENGTHS, seed=5)
    kw = dict(max_new_tokens=96, layer_reuse=LayerReuseConfig(k=2, subset="first", size=2, mode=mode), **BASE)
    free, _ = generate_new_tokens(tiny_model, prompts, fast_path=False, **kw)
    stops = []
    for row, block_idx in ((0, 0), (2, 1), (4, 2)):
        window = free[row][block_idx * 32 + 4:(block_idx + 1) * 32]
        tok = next((t for t in window if t not in stops and all(t not in r[: block_idx * 32 + 4] for r in free)), None)
        if tok is not None:
            stops.append(tok)
    assert len(stops) >= 2
    plain, ps, fast, fs = both_paths(tiny_model, prompts, eos_token_id=stops, **kw)
    assert fast == plain
    assert {k: fs[k] for k in COUNTERS} == {k: ps[k] for k in COUNTERS}


def test_fast_path_trace_matches_plain_trace(tiny_model):
    prompts = prompts_of([5, 40, 64], seed=2)
    cfg = GenerationConfig(max_new_tokens=64, layer_reuse=LayerReuseConfig(k=2, subset="first", size=2), **BASE)
    traces = []
    for mode in (False, "eager"):
        runner = LayerStackRunner(tiny_model)
        settings = resolve_settings(cfg, tiny_model.generation_config, tiny_model.config, num_layers=runner.num_layers)
        layout = plan_layout([len(p) for p in prompts], 32, 64)
        engine, _ = select_fast_path(tiny_model, runner, settings, mode, batch=len(prompts),
                                     capacity=layout.capacity_blocks * 32)
        assert (engine is None) == (mode is False)
        decoder = BlockDiffusionDecoder(runner, settings, trace=True, fast_path=engine)
        traces.append((decoder.decode(prompts), decoder.trace))
    assert traces[0] == traces[1]


def test_static_buffers_are_reused_across_calls_and_grow_when_needed(tiny_model):
    release(tiny_model)
    prompts = prompts_of([33, 40])
    generate_new_tokens(tiny_model, prompts, max_new_tokens=40, fast_path="eager", **BASE)
    store = _ENGINES[tiny_model].store
    generate_new_tokens(tiny_model, prompts[:1], max_new_tokens=40, fast_path="eager", **BASE)
    assert _ENGINES[tiny_model].store is store  # fewer rows, same capacity: same buffers
    generate_new_tokens(tiny_model, prompts * 2, max_new_tokens=200, fast_path="eager", **BASE)
    grown = _ENGINES[tiny_model].store
    assert grown is not store and grown.rows >= 4 and grown.capacity >= 256 > store.capacity
    release(tiny_model)
    assert tiny_model not in _ENGINES


def test_fast_path_falls_back_with_a_reason_not_an_error(tiny_model, caplog):
    prompts = prompts_of([20])
    _, stats = generate_new_tokens(tiny_model, prompts, max_new_tokens=16, **BASE)
    assert stats["fast_path"].startswith("off (device is cpu")
    with caplog.at_level("WARNING", logger="dllm_generation.fast_path"):
        _, stats = generate_new_tokens(tiny_model, prompts, max_new_tokens=16, fast_path="graphs", **BASE)
    assert stats["fast_path"].startswith("off (device is cpu") and "fast path not used" in caplog.text
    _, stats = generate_new_tokens(tiny_model, prompts, max_new_tokens=16, fast_path="eager", do_sample=True,
                                   temperature=0.7, seed=0, **BASE)
    assert stats["fast_path"].startswith("off (sampling")


def test_fast_path_flag_is_validated_before_compute(tiny_model):
    with pytest.raises(ValueError, match="fast_path must be one of"):
        generate_new_tokens(tiny_model, prompts_of([20]), max_new_tokens=16, fast_path="turbo", **BASE)


def test_unsupported_model_falls_back(tiny_model):
    from dllm_generation.fast_path import _unsupported_layer_reason

    runner = LayerStackRunner(tiny_model)
    assert _unsupported_layer_reason(runner) is None
    runner.model.config._attn_implementation = "flex_attention"
    try:
        assert "attention implementation" in _unsupported_layer_reason(runner)
    finally:
        runner.model.config._attn_implementation = "sdpa"


def test_engine_does_not_keep_the_model_alive(tiny_path):
    import gc
    import weakref

    from dllm_generation import load_model

    model, _ = load_model(tiny_path, dtype=torch.float32)
    generate_new_tokens(model, prompts_of([20]), max_new_tokens=16, fast_path="eager", **BASE)
    assert model in _ENGINES
    ref = weakref.ref(model)
    del model
    gc.collect()
    assert ref() is None
