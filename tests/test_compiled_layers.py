"""The compiled layer functions (torch.compile, as `fast_path="compile"` uses them) write the cache
and lay out the attention exactly as the plain ones: float32 on the CPU, tokens, counters and trace
equal to the eager engine's. Slow: compiling on two CPU cores takes about a minute."""
from __future__ import annotations

import pytest
import torch
from transformers import GenerationConfig

from dllm_generation import LayerReuseConfig
from dllm_generation.config import resolve_settings
from dllm_generation.decoding import BlockDiffusionDecoder, plan_layout
from dllm_generation.engines.graphed import GraphedEngine
from dllm_generation.runner import LayerStackRunner
from test_fast_path import BASE, COUNTERS, prompts_of


def _plain_decode_and_engine(model, lengths, seed, *, compile_layers, **settings_kw):
    """The prompts, the eager engine's tokens for them, and a graphed engine (uncaptured) ready for them."""
    prompts = prompts_of(lengths, seed=seed)
    kw = dict(max_new_tokens=48, use_block_cache=True, **settings_kw, **BASE)
    runner = LayerStackRunner(model)
    settings = resolve_settings(GenerationConfig(**kw), model.generation_config, model.config,
                                num_layers=runner.num_layers)
    want = BlockDiffusionDecoder(runner, settings).decode(prompts)
    engine = GraphedEngine(runner, settings, capture=False, compile_layers=compile_layers)
    engine.bind(runner, settings)
    engine.prepare(len(prompts), plan_layout(lengths, 32, 48).capacity_blocks * 32)
    return runner, settings, prompts, want, engine


@pytest.mark.slow
def test_compiled_layer_functions_equal_the_eager_engine_in_float32(tiny_model):
    torch._dynamo.reset()
    lengths = [5, 33, 70]
    prompts = prompts_of(lengths, seed=4)
    for reuse in (None, LayerReuseConfig(k=2, subset="first", size=2)):
        kw = dict(max_new_tokens=48, use_block_cache=True, layer_reuse=reuse, **BASE)
        runner = LayerStackRunner(tiny_model)
        settings = resolve_settings(GenerationConfig(**kw), tiny_model.generation_config, tiny_model.config,
                                    num_layers=runner.num_layers)
        capacity = plan_layout(lengths, 32, 48).capacity_blocks * 32
        want = BlockDiffusionDecoder(runner, settings, trace=True)
        want_tokens = want.decode(prompts)
        engine = GraphedEngine(runner, settings, capture=False, compile_layers=True)
        engine.bind(runner, settings)
        engine.prepare(len(prompts), capacity)
        got = BlockDiffusionDecoder(runner, settings, engine=engine, trace=True)
        assert got.decode(prompts) == want_tokens
        assert engine.describe()["compile_failure"] is None and engine.describe()["mode"] == "compile"
        assert torch._dynamo.utils.counters["stats"]["unique_graphs"] >= 2  # both layer functions compiled
        assert got.trace == want.trace
        g, w = got.stats.as_dict(), want.stats.as_dict()
        assert {k: g[k] for k in COUNTERS} == {k: w[k] for k in COUNTERS}


@pytest.mark.slow
def test_each_layer_function_compiles_once_for_every_pass_size(tiny_model):
    """One compilation per layer function serves every pass size. The first pass here has as many
    tokens as the model's hidden size (two whole-block rows of 32): with both sizes dynamic, torch's
    duck sizing would give them one symbol, specialise it with the weights, and compile again for
    the next pass size (about 10 s more per function on a GPU)."""
    assert tiny_model.config.hidden_size == 2 * BASE["block_size"]
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    runner, settings, prompts, want, engine = _plain_decode_and_engine(tiny_model, [40, 45], 6, compile_layers=True)
    decoder = BlockDiffusionDecoder(runner, settings, engine=engine)
    assert decoder.decode(prompts) == want
    assert decoder.stats.block_forwards > 0 and decoder.stats.sub_block_forwards > 0  # 32 and 8 tokens
    assert engine.describe()["compile_failure"] is None
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == 2


@pytest.mark.slow
def test_the_layer_functions_compile_once_for_batch_1_and_then_larger_batches(tiny_model):
    """A batch-1 pass has one row and as many tokens as query slots (8 or 32). Were any of the sizes
    that vary between passes (tokens, rows x heads of the attention's layout, query slots) compiled
    as fixed, the first larger batch (rows of both kinds in one pass) would compile every layer
    function again. (The engine's buffers are sized for the larger batch from the start: growing
    them is a new shape of their own.)"""
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    runner, settings, larger, want_larger, engine = _plain_decode_and_engine(tiny_model, [5, 40, 70], 7,
                                                                             compile_layers=True)
    single = prompts_of([40], seed=0)
    want_single = BlockDiffusionDecoder(runner, settings).decode(single)
    for prompts, want in ((single, want_single), (larger, want_larger)):
        assert BlockDiffusionDecoder(runner, settings, engine=engine).decode(prompts) == want
        assert engine.describe()["compile_failure"] is None
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == 2


def test_a_compile_failure_on_a_later_pass_shape_falls_back_to_the_plain_functions(tiny_model, caplog):
    """torch.compile recompiles the layer functions for a new pass shape (and can fail then, e.g. at
    its recompile limit): that pass and every later one run the plain functions, with the same tokens."""
    runner, settings, prompts, want, engine = _plain_decode_and_engine(tiny_model, [5, 40], 9, compile_layers=False)
    packed = engine.packed
    packed.compile_layers = True  # stands in for compiled functions that fail on their second shape
    plain_pre, shapes = packed.math.pre_attention, []

    def pre_failing_on_a_new_shape(layer, *args):
        tokens = args[3].shape[0]
        if tokens not in shapes:
            shapes.append(tokens)
        if len(shapes) > 1:
            raise RuntimeError("recompile limit reached")
        return plain_pre(layer, *args)

    packed.pre = pre_failing_on_a_new_shape
    with caplog.at_level("WARNING", logger="dllm_generation.engines.packed_pass"):
        got = BlockDiffusionDecoder(runner, settings, engine=engine).decode(prompts)
    assert got == want
    assert len(shapes) == 2 and packed.pre == packed.math.pre_attention
    assert engine.describe()["compile_failure"] == "RuntimeError: recompile limit reached"
    assert "torch.compile failed, continuing without it" in caplog.text
