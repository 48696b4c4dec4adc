"""The graphed engine (engines/graphed.py) executes the decoder's plans exactly as the eager engine.

On the CPU its passes run without CUDA graphs (`fast_path="uncaptured"`); in float32 they must
reproduce the eager engine token for token, with identical counters and traces. By default on the
CPU the eager engine runs, with the reason reported; an explicit request the graphed engine cannot
serve is an error before any compute.
"""

from __future__ import annotations

from collections import Counter

import pytest
import torch
from conftest import TINY_MASK, generate_new_tokens
from transformers import GenerationConfig

from dllm_generation import LayerReuseConfig
from dllm_generation.config import resolve_settings
from dllm_generation.decoding import BlockDiffusionDecoder, plan_layout
from dllm_generation.engines import release, select_engine
from dllm_generation.engines.eager import EagerEngine
from dllm_generation.engines.graphed import GraphedEngine
from dllm_generation.engines.selection import graphed_engine_of, unsupported_layer_reason
from dllm_generation.runner import LayerStackRunner
from dllm_generation.testing import random_prompts

LENGTHS = [5, 31, 32, 33, 64, 70]
BASE = dict(block_size=32, small_block_size=8, threshold=0.9)
COUNTERS = ("forwards", "prefill_forwards", "commit_forwards", "block_forwards", "sub_block_forwards",
            "denoising_steps", "generated_tokens", "layer_calls", "layer_calls_skipped", "layer_runs", "layer_skips")


def prompts_of(lengths, seed=1):
    return random_prompts(lengths, TINY_MASK - 8, seed=seed)


def both_engines(model, prompts, **kw):
    plain, ps = generate_new_tokens(model, prompts, fast_path=False, **kw)
    fast, fs = generate_new_tokens(model, prompts, fast_path="uncaptured", **kw)
    assert fs["fast_path"]["mode"] == "uncaptured"
    assert ps["fast_path"] == "off (fast_path=False)"
    return plain, ps, fast, fs


REUSE = [None, LayerReuseConfig(k=1, subset="first", size=2), LayerReuseConfig(k=2, subset="middle", size=2),
         LayerReuseConfig(k=3, subset="last", size=2), LayerReuseConfig(k=2, subset="first", size=3, mode="residual"),
         LayerReuseConfig(policy="unmask_drift", tolerance=0.25, max_staleness=3, subset="first", size=2)]


@pytest.mark.parametrize("use_block_cache", [True, False])
@pytest.mark.parametrize("reuse", REUSE, ids=lambda r: "none" if r is None else r.label)
def test_graphed_engine_equals_eager_engine_tokens_and_stats(tiny_model, use_block_cache, reuse):
    prompts = prompts_of(LENGTHS)
    plain, ps, fast, fs = both_engines(tiny_model, prompts, max_new_tokens=72, use_block_cache=use_block_cache,
                                       layer_reuse=reuse, **BASE)
    assert fast == plain
    assert {k: fs[k] for k in COUNTERS} == {k: ps[k] for k in COUNTERS}
    if use_block_cache:
        assert fs["sub_block_forwards"] > 0 and fs["block_forwards"] > 0


@pytest.mark.parametrize("mode", ["output", "residual"])
def test_graphed_engine_equals_eager_when_rows_stop_in_different_blocks(tiny_model, mode):
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
    plain, ps, fast, fs = both_engines(tiny_model, prompts, eos_token_id=stops, **kw)
    assert fast == plain
    assert {k: fs[k] for k in COUNTERS} == {k: ps[k] for k in COUNTERS}


def _decode(model, prompts, mode, cfg):
    runner = LayerStackRunner(model)
    settings = resolve_settings(GenerationConfig(fast_path=mode, **cfg), model.generation_config, model.config,
                                num_layers=runner.num_layers)
    layout = plan_layout([len(p) for p in prompts], 32, cfg["max_new_tokens"])
    engine, _ = select_engine(model, runner, settings, batch=len(prompts), capacity=layout.capacity_blocks * 32)
    decoder = BlockDiffusionDecoder(runner, settings, engine=engine, trace=True)
    return decoder.decode(prompts), decoder


def test_graphed_engine_trace_matches_eager_trace(tiny_model):
    prompts = prompts_of([5, 40, 64], seed=2)
    cfg = dict(max_new_tokens=64, layer_reuse=LayerReuseConfig(k=2, subset="first", size=2), **BASE)
    (out_e, dec_e), (out_g, dec_g) = (_decode(tiny_model, prompts, mode, cfg) for mode in (False, "uncaptured"))
    assert isinstance(dec_e.engine, EagerEngine) and isinstance(dec_g.engine, GraphedEngine)
    assert out_e == out_g and dec_e.trace == dec_g.trace
    assert dec_e.stats.as_dict() | {"wall_seconds": 0} == dec_g.stats.as_dict() | {"wall_seconds": 0}


@pytest.mark.parametrize("use_block_cache", [True, False])
@pytest.mark.parametrize("reuse", [None, LayerReuseConfig(k=1, subset="first", size=2)], ids=["none", "k1"])
def test_repeated_steps_give_the_eager_trace(tiny_model, use_block_cache, reuse):
    """Without a schedule that recalls, the graphed engine repeats a step while the decoder would plan
    it again (whole-block rows wait for their sub-block's first slot); every run is traced and counted
    as its own step, exactly as the eager engine's one-step-per-plan decode."""
    prompts = prompts_of([5, 40, 64], seed=4)
    cfg = dict(max_new_tokens=64, use_block_cache=use_block_cache, layer_reuse=reuse, **BASE)
    (out_e, dec_e), (out_g, dec_g) = (_decode(tiny_model, prompts, mode, cfg) for mode in (False, "uncaptured"))
    assert out_e == out_g and dec_e.trace == dec_g.trace
    assert dec_e.stats.as_dict() | {"wall_seconds": 0} == dec_g.stats.as_dict() | {"wall_seconds": 0}
    repeated = dec_g.engine.describe()["repeated_runs"]
    assert 0 < repeated < dec_g.stats.denoising_steps
    single, decoder = _decode(tiny_model, prompts[1:2], "uncaptured", cfg)
    assert single == [out_g[1]]  # a row's steps repeat alike alone and in a batch


class ModuleCalls:
    """Counts calls of each layer's modules that both engines call (o_proj and mlp)."""

    def __init__(self, model):
        self.q, self.mlp, self.handles = Counter(), Counter(), []
        for i, layer in enumerate(model.model.layers):
            self.handles.append(layer.self_attn.o_proj.register_forward_hook(lambda *_, i=i: self.q.update([i])))
            self.handles.append(layer.mlp.register_forward_hook(lambda *_, i=i: self.mlp.update([i])))

    def close(self):
        for h in self.handles:
            h.remove()


@pytest.mark.parametrize("mode", [False, "uncaptured"])
def test_both_engines_run_the_model_modules_exactly_as_counted(tiny_model, mode):
    """The graphed engine calls the model's own modules; recalled layers are not called at all."""
    prompts = prompts_of([5, 40], seed=3)
    cfg = dict(max_new_tokens=64, threshold=1.0, block_size=32, small_block_size=8,
               layer_reuse=LayerReuseConfig(k=2, layers=[1, 2]))
    calls = ModuleCalls(tiny_model)
    try:
        _, decoder = _decode(tiny_model, prompts, mode, cfg)
    finally:
        calls.close()
    stats = decoder.stats.as_dict()
    full = stats["prefill_forwards"] + stats["commit_forwards"]  # every layer, one call each
    if mode is False:  # one call per planned forward
        expected = stats["layer_runs"]
    else:  # one call per pass: a step's forwards with the same reuse decision share one packed pass
        passes = {(e["step"], e["compute"]) for e in decoder.trace}
        computing = sum(1 for _, compute in passes if compute)
        expected = [full + len(passes), full + computing, full + computing, full + len(passes)]
        assert len(passes) < len(decoder.trace)  # some steps packed a whole-block and a sub-block forward
    assert [calls.q[i] for i in range(4)] == [calls.mlp[i] for i in range(4)] == expected
    assert expected[1] < expected[0] and sum(stats["layer_skips"]) > 0


def test_static_buffers_are_reused_across_calls_and_grow_when_needed(tiny_model):
    release(tiny_model)
    prompts = prompts_of([33, 40])
    generate_new_tokens(tiny_model, prompts, max_new_tokens=40, fast_path="uncaptured", **BASE)
    store = graphed_engine_of(tiny_model).store
    generate_new_tokens(tiny_model, prompts[:1], max_new_tokens=40, fast_path="uncaptured", **BASE)
    assert graphed_engine_of(tiny_model).store is store  # fewer rows, same capacity: same buffers
    generate_new_tokens(tiny_model, prompts * 2, max_new_tokens=200, fast_path="uncaptured", **BASE)
    grown = graphed_engine_of(tiny_model).store
    assert grown is not store and grown.rows >= 4 and grown.capacity >= 256 > store.capacity
    release(tiny_model)
    assert graphed_engine_of(tiny_model) is None


def test_default_falls_back_with_a_reason_and_explicit_requests_are_errors(tiny_model, caplog, monkeypatch):
    from dllm_generation.engines import selection

    monkeypatch.setattr(selection, "_FALLBACKS_LOGGED", set())
    prompts = prompts_of([20])
    with caplog.at_level("INFO", logger="dllm_generation.engines.selection"):
        for _ in range(3):
            _, stats = generate_new_tokens(tiny_model, prompts, max_new_tokens=16, **BASE)
    assert stats["fast_path"].startswith("off (device is cpu")  # every call says why, in its stats
    assert caplog.text.count("fast path not used") == 1, caplog.text  # the log says it once per process
    for mode in ("graphs", "compile"):
        with pytest.raises(ValueError, match=f"fast_path='{mode}' cannot serve this call: device is cpu"):
            generate_new_tokens(tiny_model, prompts, max_new_tokens=16, fast_path=mode, **BASE)
    with pytest.raises(ValueError, match="fast_path='uncaptured' cannot serve this call: sampling"):
        generate_new_tokens(tiny_model, prompts, max_new_tokens=16, fast_path="uncaptured", do_sample=True,
                            temperature=0.7, seed=0, **BASE)
    _, stats = generate_new_tokens(tiny_model, prompts, max_new_tokens=16, do_sample=True, temperature=0.7, seed=0,
                                   **BASE)
    assert stats["fast_path"].startswith("off (device is cpu")


@pytest.mark.parametrize("bad", ["turbo", "eager", 1, 0.5])
def test_fast_path_flag_is_validated_before_compute(tiny_model, bad):
    with pytest.raises(ValueError, match="fast_path must be one of"):
        resolve_settings(GenerationConfig(fast_path=bad, max_new_tokens=8), tiny_model.generation_config,
                         tiny_model.config, num_layers=4)


def test_unsupported_model_is_refused_with_a_reason(tiny_model):
    runner = LayerStackRunner(tiny_model)
    assert unsupported_layer_reason(runner) is None
    runner.model.config._attn_implementation = "flex_attention"
    try:
        assert "attention implementation" in unsupported_layer_reason(runner)
    finally:
        runner.model.config._attn_implementation = "sdpa"


def test_engine_does_not_keep_the_model_alive(tiny_path):
    import gc
    import weakref

    from dllm_generation import load_model

    model, _ = load_model(tiny_path, dtype=torch.float32)
    generate_new_tokens(model, prompts_of([20]), max_new_tokens=16, fast_path="uncaptured", **BASE)
    assert graphed_engine_of(model) is not None
    ref = weakref.ref(model)
    del model
    gc.collect()
    assert ref() is None


def test_qkv_weights_share_one_storage_without_a_second_copy(tiny_path, tmp_path):
    """The graphed engine moves q/k/v into one storage (one matrix product instead of three): the
    parameters keep their values, the model still saves and reloads, and nothing is copied twice."""
    from dllm_generation import load_model

    model, _ = load_model(tiny_path, dtype=torch.float32)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    prompts = prompts_of([20, 33])
    eager_out, _ = generate_new_tokens(model, prompts, max_new_tokens=32, fast_path=False, **BASE)
    graphed_out, _ = generate_new_tokens(model, prompts, max_new_tokens=32, fast_path="uncaptured", **BASE)
    assert graphed_out == eager_out
    engine = graphed_engine_of(model)
    for layer, (weight, bias) in zip(model.model.layers, engine.packed.qkv):
        attn = layer.self_attn
        for proj in (attn.q_proj, attn.k_proj, attn.v_proj):
            assert proj.weight.untyped_storage().data_ptr() == weight.untyped_storage().data_ptr()
            assert proj.bias.untyped_storage().data_ptr() == bias.untyped_storage().data_ptr()
        assert torch.equal(weight, torch.cat([attn.q_proj.weight, attn.k_proj.weight, attn.v_proj.weight]))
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    # A second engine of the same model finds the storage already shared and copies nothing.
    pointers = [w.data_ptr() for w, _ in engine.packed.qkv]
    release(model)
    generate_new_tokens(model, prompts, max_new_tokens=32, fast_path="uncaptured", **BASE)
    assert [w.data_ptr() for w, _ in graphed_engine_of(model).packed.qkv] == pointers
    assert generate_new_tokens(model, prompts, max_new_tokens=32, fast_path=False, **BASE)[0] == eager_out
    model.save_pretrained(tmp_path)
    reloaded, _ = load_model(str(tmp_path), dtype=torch.float32)
    assert all(torch.equal(v, before[k]) for k, v in reloaded.state_dict().items())


def test_attended_keys_round_up_to_a_few_sizes_within_the_capacity():
    from dllm_generation.engines.packed_pass import attended_keys

    sizes = [attended_keys(n, 10**6) for n in (1, 128, 129, 257, 385, 513, 769, 1025, 1537, 2049, 3073)]
    assert sizes == [128, 128, 256, 384, 512, 768, 1024, 1536, 2048, 3072, 4096]
    assert attended_keys(600, 448) == 448 and attended_keys(96, 448) == 128


def test_after_a_long_prompt_a_short_one_attends_only_the_keys_it_needs(tiny_model, monkeypatch):
    """The static buffers keep the capacity of the largest call so far; a later call's passes read
    only the keys their prefix and block need (rounded up to `attended_keys`), with the eager
    engine's tokens and counters."""
    from dllm_generation.engines.packed_pass import PackedPass, attended_keys

    release(tiny_model)
    long_prompt, short = prompts_of([600], seed=6), prompts_of([100], seed=7)
    generate_new_tokens(tiny_model, long_prompt, max_new_tokens=32, fast_path="uncaptured", **BASE)
    capacity = graphed_engine_of(tiny_model).store.capacity
    attended, real_attend = [], PackedPass._attend

    def attend(self, queries, keys, values, *args):
        attended.append(keys.shape[2])
        return real_attend(self, queries, keys, values, *args)

    monkeypatch.setattr(PackedPass, "_attend", attend)
    want, ws = generate_new_tokens(tiny_model, short, max_new_tokens=96, fast_path=False, **BASE)
    got, gs = generate_new_tokens(tiny_model, short, max_new_tokens=96, fast_path="uncaptured", **BASE)
    assert got == want and {k: gs[k] for k in COUNTERS} == {k: ws[k] for k in COUNTERS}
    # The prompt's 3 whole blocks are the prefix (96 slots); the prefix grows by a block per commit,
    # and a pass needs its prefix and its block: 128, then 160-224 slots.
    assert capacity >= 640 and set(attended) == {attended_keys(128, capacity), attended_keys(160, capacity)} == {128, 256}
    release(tiny_model)


class RerunGraph:
    """A captured graph's replay semantics on the CPU: its recorded work runs again on the same
    buffers. Capturing records and runs nothing, as a real capture executes nothing."""

    def __init__(self, key, run, replays: Counter):
        self.key, self.run, self.replays = key, run, replays

    def replay(self):
        self.replays[type(self.key).__name__] += 1
        self.run()


def _decode_twice_on_one_capturing_engine(model, prompts, cfg):
    """Two decodes of `prompts` by one graphed engine that captures (the test stands in for the
    graphs); returns the engine and each call's (tokens, decoder)."""
    settings = resolve_settings(GenerationConfig(**cfg), model.generation_config, model.config,
                                num_layers=len(model.model.layers))
    capacity = plan_layout([len(p) for p in prompts], 32, cfg["max_new_tokens"]).capacity_blocks * 32
    engine, calls = None, []
    for _ in range(2):
        runner = LayerStackRunner(model)
        engine = engine or GraphedEngine(runner, settings, capture=True, compile_layers=False)
        engine.bind(runner, settings)
        engine.prepare(len(prompts), capacity)
        decoder = BlockDiffusionDecoder(runner, settings, engine=engine, trace=True)
        calls.append((decoder.decode(prompts), decoder))
    return engine, calls


@pytest.mark.parametrize("limit", [None, 0], ids=["captured", "over-the-limit"])
def test_a_captured_prefill_replays_with_the_eager_tokens_counters_and_trace(tiny_model, monkeypatch, limit):
    """The graphed engine captures the prompt prefill per (rows, length) after its first run and
    replays it in later calls (here: the second of two). Tokens, counters and trace stay the eager
    engine's. Prefills over `PREFILL_GRAPH_TOKENS` run eager."""
    from dllm_generation.engines import captured, graphed

    replays = Counter()

    def capture(self, key, run, *, keep, optional=False):
        self.graphs[key] = RerunGraph(key, run, replays)

    monkeypatch.setattr(captured.CapturedPasses, "capture", capture)
    monkeypatch.setattr(captured, "loop_support", lambda device: "no device loops in this test")
    if limit is not None:
        monkeypatch.setattr(graphed, "PREFILL_GRAPH_TOKENS", limit)
    prompts = prompts_of([40, 70, 5], seed=4)  # prefixes of 64 slots (rows left-padded by whole blocks)
    cfg = dict(max_new_tokens=48, **BASE)
    want, eager = _decode(tiny_model, prompts, False, cfg)
    engine, calls = _decode_twice_on_one_capturing_engine(tiny_model, prompts, cfg)
    for got, decoder in calls:
        assert got == want and decoder.trace == eager.trace
        assert decoder.stats.as_dict() | {"wall_seconds": 0} == eager.stats.as_dict() | {"wall_seconds": 0}
    prefill_keys = [key for key in engine.captured.graphs if isinstance(key, graphed.PrefillKey)]
    if limit is None:
        assert prefill_keys == [graphed.PrefillKey(rows=3, length=64, mask_id=TINY_MASK)]
        assert replays["PrefillKey"] == 1 and replays["PassKey"] > 0
    else:
        assert prefill_keys == [] and replays["PrefillKey"] == 0


def test_a_prefill_that_cannot_be_captured_runs_eager_and_the_passes_keep_their_graphs(tiny_model, monkeypatch,
                                                                                       caplog):
    """A capture of the prefill that fails (here: raising as an operation forbidden while capturing
    does) is logged once; prefills then run eager, the passes are still captured and replayed, and
    the tokens stay the eager engine's."""
    from contextlib import contextmanager

    from dllm_generation.engines import captured, graphed

    replays, attempts = Counter(), []
    real_capture = captured.CapturedPasses.capture

    @contextmanager
    def forbidden(graph, pool=None):
        attempts.append(graph)
        raise RuntimeError("operation not permitted when stream is capturing")
        yield  # pragma: no cover

    def capture(self, key, run, *, keep, optional=False):
        if not isinstance(key, graphed.PrefillKey):
            self.graphs[key] = RerunGraph(key, run, replays)
            return None
        with monkeypatch.context() as patch:
            patch.setattr(captured.torch.cuda, "CUDAGraph", lambda keep_graph=False: object())
            patch.setattr(captured.torch.cuda, "graph", forbidden)
            patch.setattr(captured.torch.cuda, "graph_pool_handle", lambda: object())
            patch.setattr(captured.torch.cuda, "synchronize", lambda *a, **k: None)
            return real_capture(self, key, run, keep=keep, optional=optional)

    monkeypatch.setattr(captured.CapturedPasses, "capture", capture)
    monkeypatch.setattr(captured, "loop_support", lambda device: "no device loops in this test")
    prompts = prompts_of([40, 70, 5], seed=4)
    cfg = dict(max_new_tokens=48, **BASE)
    want, _ = _decode(tiny_model, prompts, False, cfg)
    with caplog.at_level("WARNING", logger="dllm_generation.engines.graphed"):
        engine, calls = _decode_twice_on_one_capturing_engine(tiny_model, prompts, cfg)
    assert [got for got, _ in calls] == [want, want]
    described = engine.describe()
    assert len(attempts) == 1 and described["prefill_failure"].startswith("RuntimeError: operation not permitted")
    assert described["graph_failure"] is None and replays["PassKey"] > 0
    assert caplog.text.count("capturing the prompt prefill failed, prefills run eager") == 1


def test_running_out_of_memory_while_capturing_frees_the_graphs_and_decodes_on(tiny_model, monkeypatch, caplog):
    """Simulated on the CPU: capturing raises OutOfMemoryError. The engine drops every graph it held
    (here one captured earlier for another pass shape), logs why, and finishes the decode
    uncaptured with the eager engine's tokens."""
    from contextlib import contextmanager

    from dllm_generation.engines import captured

    attempts = []

    class FakeGraph:
        def __init__(self, keep_graph=False):
            pass

        def replay(self):
            raise AssertionError("no graph may be replayed after the failure")

    @contextmanager
    def out_of_memory(graph, pool=None):
        attempts.append(graph)
        raise torch.OutOfMemoryError("CUDA out of memory (simulated)")
        yield  # pragma: no cover

    monkeypatch.setattr(captured.torch.cuda, "CUDAGraph", FakeGraph)
    monkeypatch.setattr(captured.torch.cuda, "graph", out_of_memory)
    monkeypatch.setattr(captured.torch.cuda, "graph_pool_handle", lambda: object())
    monkeypatch.setattr(captured.torch.cuda, "synchronize", lambda *a, **k: None)
    monkeypatch.setattr(captured.torch.cuda, "empty_cache", lambda: None)
    prompts = prompts_of([5, 40], seed=9)
    kw = dict(max_new_tokens=48, **BASE)
    want, _ = generate_new_tokens(tiny_model, prompts, fast_path=False, **kw)
    runner = LayerStackRunner(tiny_model)
    settings = resolve_settings(GenerationConfig(**kw), tiny_model.generation_config, tiny_model.config,
                                num_layers=runner.num_layers)
    engine = GraphedEngine(runner, settings, capture=True, compile_layers=False)
    engine.bind(runner, settings)
    engine.prepare(len(prompts), plan_layout([5, 40], 32, 48).capacity_blocks * 32)
    engine.captured.graphs["a pass shape captured earlier"] = FakeGraph()
    engine.captured.pool = object()
    with caplog.at_level("WARNING", logger="dllm_generation.engines.captured"):
        got = BlockDiffusionDecoder(runner, settings, engine=engine).decode(prompts)
    assert got == [w[: len(g)] for g, w in zip(got, want)]
    assert len(attempts) == 1 and not engine.captured.graphs and engine.captured.pool is None
    assert engine.describe()["graph_failure"].startswith("out of memory while capturing")
    assert "graphs freed, continuing without them" in caplog.text
    assert engine.describe()["uncaptured_passes"] > 2


def test_a_pass_of_whole_block_and_sub_block_rows_attends_once_per_layer(tiny_model, monkeypatch):
    """Rows that forward their whole block and rows that forward a sub-block share a pass, and that
    pass runs one attention call per layer (not one per kind of row), with the eager engine's tokens."""
    from dllm_generation.engines import packed_pass

    calls, passes = Counter(), []
    real_attention, real_run = packed_pass.F.scaled_dot_product_attention, packed_pass.PackedPass.run

    def attention(*args, **kwargs):
        calls[len(passes)] += 1
        return real_attention(*args, **kwargs)

    def run(self, key, store, runner):
        passes.append(key)
        real_run(self, key, store, runner)

    monkeypatch.setattr(packed_pass.F, "scaled_dot_product_attention", attention)
    monkeypatch.setattr(packed_pass.PackedPass, "run", run)
    prompts = prompts_of([5, 40, 64, 70], seed=12)
    kw = dict(max_new_tokens=64, use_block_cache=True, **BASE)
    want, _ = generate_new_tokens(tiny_model, prompts, fast_path=False, **kw)
    calls.clear()
    passes.clear()
    got, _ = generate_new_tokens(tiny_model, prompts, fast_path="uncaptured", **kw)
    assert got == want
    assert any(key.rb and key.rs for key in passes)  # some passes mix both kinds of rows
    layers = tiny_model.config.num_hidden_layers
    assert all(calls[i] == layers for i in range(1, len(passes) + 1))


def test_the_last_layer_runs_o_proj_and_the_mlp_only_on_the_tokens_the_logits_read(tiny_model):
    """After the last layer's attention (every token's keys and values written) only the hidden
    states that predict a sub-block slot go on: 8 per row, not a whole block's 32; every other layer,
    and a block commit, take every token. The tokens stay the eager engine's."""
    prompts = prompts_of([5, 40, 64, 70], seed=12)
    cfg = dict(max_new_tokens=64, use_block_cache=True, **BASE)
    want, _ = generate_new_tokens(tiny_model, prompts, fast_path=False, **cfg)
    layers = tiny_model.model.layers
    tokens_in = {0: [], len(layers) - 1: []}
    hooks = [layers[i].mlp.register_forward_hook(lambda _m, args, _o, i=i: tokens_in[i].append(args[0].shape[0]))
             for i in tokens_in]
    try:
        got, _ = generate_new_tokens(tiny_model, prompts, fast_path="uncaptured", **cfg)
    finally:
        for hook in hooks:
            hook.remove()
    assert got == want
    first, last = tokens_in[0], tokens_in[len(layers) - 1]
    assert len(first) == len(last)
    trimmed = [(n, m) for n, m in zip(first, last) if m < n]
    assert trimmed and all(m % BASE["small_block_size"] == 0 and m < n for n, m in trimmed)
    # The prefill, the block commits and the passes of sub-block rows only keep every token.
    assert any(n == m for n, m in zip(first, last))
