"""Layer reuse: schedule, zero compute on reuse steps, subsets, batch invariance, both modes."""

from __future__ import annotations

import math
from collections import Counter

import pytest
import torch
from conftest import TINY_MASK, generate_new_tokens
from test_decoding import _stop_ids_in_different_blocks, replay_block_cache_kinds
from transformers import GenerationConfig

from dllm_generation import BlockDiffusionCache, LayerReuseConfig
from dllm_generation.config import resolve_settings
from dllm_generation.decoding import BlockDiffusionDecoder
from dllm_generation.plan import ForwardKind, LayerAction, layer_actions
from dllm_generation.reuse.schedule import RowStep
from dllm_generation.runner import LayerStackRunner, ReusePlan
from dllm_generation.testing import random_prompts

LENGTHS = [5, 31, 32, 33, 64, 70]
BASE = dict(block_size=32, small_block_size=8, threshold=0.9)


def prompts_of(lengths, seed=1):
    return random_prompts(lengths, TINY_MASK - 8, seed=seed)


@pytest.mark.parametrize("subset", ["first", "middle", "last"])
@pytest.mark.parametrize("use_block_cache", [True, False])
def test_k1_is_exactly_the_plain_decoder(tiny_model, subset, use_block_cache):
    prompts = prompts_of(LENGTHS)
    kw = dict(max_new_tokens=64, use_block_cache=use_block_cache, **BASE)
    plain, s0 = generate_new_tokens(tiny_model, prompts, **kw)
    reuse, s1 = generate_new_tokens(tiny_model, prompts, layer_reuse=LayerReuseConfig(k=1, subset=subset, size=2), **kw)
    assert reuse == plain
    for key in ("forwards", "block_forwards", "sub_block_forwards", "commit_forwards", "denoising_steps", "layer_calls"):
        assert s1[key] == s0[key], key
    assert s1["layer_calls_skipped"] == 0
    if use_block_cache:
        assert s1["sub_block_forwards"] > 0


def test_k1_stores_nothing(tiny_model):
    """k=1 never recalls, so no forward keeps a layer's result for later (no copies into reuse entries)."""
    runner = LayerStackRunner(tiny_model)
    kw = dict(max_new_tokens=64, layer_reuse=LayerReuseConfig(k=1, subset="first", size=2), **BASE)
    settings = resolve_settings(GenerationConfig(**kw), tiny_model.generation_config, tiny_model.config,
                                num_layers=runner.num_layers)
    decoder = BlockDiffusionDecoder(runner, settings)
    plans = []
    inner = decoder.engine.denoise

    def recording_denoise(step, *args, **kwargs):
        plans.extend(step)
        return inner(step, *args, **kwargs)

    decoder.engine.denoise = recording_denoise
    decoder.decode(prompts_of(LENGTHS[:2]))
    assert plans and not any(plan.stores or plan.recalls for plan in plans)
    assert all(layer.reuse_output is None for layer in decoder.engine.cache.layers)


class ExecutionCounter:
    """Counts calls of every decoder layer's attention and MLP modules via forward hooks."""

    def __init__(self, model):
        self.attn, self.mlp = Counter(), Counter()
        self.handles = []
        for i, layer in enumerate(model.model.layers):
            self.handles.append(layer.self_attn.register_forward_hook(lambda *_, i=i: self.attn.update([i])))
            self.handles.append(layer.mlp.register_forward_hook(lambda *_, i=i: self.mlp.update([i])))

    def close(self):
        for h in self.handles:
            h.remove()


def run_decoder(model, prompts, **gen_kwargs):
    runner = LayerStackRunner(model)
    settings = resolve_settings(GenerationConfig(**gen_kwargs), model.generation_config, model.config,
                                num_layers=runner.num_layers)
    decoder = BlockDiffusionDecoder(runner, settings, trace=True)
    out = decoder.decode(prompts)
    return out, decoder


@pytest.mark.parametrize("k", [2, 3])
@pytest.mark.parametrize("use_block_cache", [True, False])
@pytest.mark.parametrize("mode", ["output", "residual"])
def test_skipped_layers_run_zero_times_and_counts_follow_the_schedule(tiny_model, k, use_block_cache, mode):
    prompt = prompts_of([40], seed=k)[0]
    counter = ExecutionCounter(tiny_model)
    try:
        _, decoder = run_decoder(tiny_model, [prompt], max_new_tokens=64, threshold=1.0, block_size=32,
                                 small_block_size=8, use_block_cache=use_block_cache,
                                 layer_reuse=LayerReuseConfig(k=k, layers=[1, 2], mode=mode))
    finally:
        counter.close()
    stats, trace = decoder.stats.as_dict(), decoder.trace
    # Steps per sub-block, from the trace; the schedule computes at steps 0, k, 2k, ...
    steps_per_sub = Counter((s["block"], s["sub"][0]) for s in trace)
    computes = sum(math.ceil(n / k) for n in steps_per_sub.values())
    fixed_forwards = stats["prefill_forwards"] + stats["commit_forwards"]  # always every layer
    assert stats["forwards"] == fixed_forwards + len(trace)
    for i in range(4):
        expected = stats["forwards"] if i in (0, 3) else fixed_forwards + computes
        assert counter.attn[i] == counter.mlp[i] == expected == stats["layer_runs"][i], i
    assert stats["layer_skips"] == [0, len(trace) - computes, len(trace) - computes, 0]
    assert stats["layer_calls_skipped"] == 2 * (len(trace) - computes) > 0
    assert [s["compute"] for s in trace] == [
        idx % k == 0 for idx in _step_index_in_sub_block(trace)
    ]


def _step_index_in_sub_block(trace):
    seen = Counter()
    out = []
    for s in trace:
        key = (s["block"], s["sub"][0])
        out.append(seen[key])
        seen[key] += 1
    return out


@pytest.mark.parametrize("k", [2, 3])
def test_block_cache_decision_is_independent_of_layer_reuse(tiny_model, k):
    prompt = prompts_of([64], seed=21)[0]
    _, decoder = run_decoder(tiny_model, [prompt], max_new_tokens=64, threshold=1.0, block_size=32,
                             small_block_size=8, use_block_cache=True, layer_reuse=LayerReuseConfig(k=k, layers=[1]))
    kinds = [s["kind"] for s in decoder.trace]
    assert kinds == replay_block_cache_kinds(decoder.trace, prompt_tail=0)
    assert "sub" in kinds


@pytest.mark.parametrize("num_layers, size", [(4, 2), (28, 12), (36, 12), (28, 27)])
def test_subsets_hold_exactly_size_layers(num_layers, size):
    first = LayerReuseConfig(subset="first", size=size).resolve_layers(num_layers)
    middle = LayerReuseConfig(subset="middle", size=size).resolve_layers(num_layers)
    last = LayerReuseConfig(subset="last", size=size).resolve_layers(num_layers)
    for layers in (first, middle, last):
        assert len(layers) == size and len(set(layers)) == size
        assert list(layers) == list(range(layers[0], layers[0] + size))
        assert 0 <= layers[0] and layers[-1] < num_layers
    assert first[0] == 1 and 0 not in first
    assert last[-1] == num_layers - 1
    below, above = middle[0], num_layers - 1 - middle[-1]
    assert abs(below - above) <= 1
    if (num_layers, size) == (28, 12):
        assert first == tuple(range(1, 13)) and middle == tuple(range(8, 20)) and last == tuple(range(16, 28))


@pytest.mark.parametrize(
    "kwargs, field",
    [
        (dict(k=0), "k"),
        (dict(k=1.5), "k"),
        (dict(subset="inner"), "subset"),
        (dict(size=0), "size"),
        (dict(layers=[2, 2, 3]), "duplicate"),
        (dict(layers=[-1]), "layers"),
        (dict(mode="blend"), "mode"),
    ],
)
def test_bad_reuse_configs_name_the_field(kwargs, field):
    with pytest.raises(ValueError, match=field):
        LayerReuseConfig(**kwargs)


def test_size_and_layer_range_are_checked_against_the_model():
    with pytest.raises(ValueError, match=r"size=4 is too large for a model of 4 layers \(allowed: at most 3 layers"):
        LayerReuseConfig(size=4).resolve_layers(4)
    with pytest.raises(ValueError, match=r"size=0.9 \(0.9 of 4 layers rounds to 4\) is too large"):
        LayerReuseConfig(size=0.9).resolve_layers(4)
    with pytest.raises(ValueError, match=r"layers \[4\] out of range"):
        LayerReuseConfig(layers=[1, 4]).resolve_layers(4)


@pytest.mark.parametrize("num_layers, count", [(28, 12), (14, 6), (36, 15), (4, 2), (2, 1)])
def test_default_size_is_a_share_that_fits_every_depth(num_layers, count):
    """The default is 12 of 28 layers as a share, so the same config runs on any model of >= 2 layers."""
    default = LayerReuseConfig(k=2)
    assert default.size == 12 / 28 and default.layer_count(num_layers) == count
    for subset in ("first", "middle", "last"):
        assert len(LayerReuseConfig(k=2, subset=subset).resolve_layers(num_layers)) == count
    assert LayerReuseConfig(k=2).resolve_layers(28) == LayerReuseConfig(k=2, size=12).resolve_layers(28)


@pytest.mark.parametrize("size, count", [(0.5, 14), (0.25, 7), (0.01, 1), (0.98, 27)])
def test_explicit_share_rounds_half_up_and_an_int_is_a_count(size, count):
    assert LayerReuseConfig(size=size).layer_count(28) == count
    assert LayerReuseConfig(size=count).resolve_layers(28) == LayerReuseConfig(size=size).resolve_layers(28)
    assert LayerReuseConfig(size=1).layer_count(28) == 1  # an int is never a share
    assert LayerReuseConfig(size=0.5).label == "k1-first0.5-output" and LayerReuseConfig(size=12).label == "k1-first12-output"


@pytest.mark.parametrize("size", [0.0, 1.0, 1.5, -0.5, -2, True, "12"])
def test_sizes_that_are_neither_count_nor_share_are_refused(size):
    with pytest.raises(ValueError, match=r"LayerReuseConfig.size=.* is out of range \(allowed: an integer >= 1 .* float in \(0, 1\)"):
        LayerReuseConfig(size=size)


def test_default_size_runs_on_a_shallow_model_and_round_trips_json(tiny_model, tmp_path):
    """`LayerReuseConfig(k=2, subset="first")` as the README writes it, on the 4-layer test model."""
    cfg = GenerationConfig(max_new_tokens=32, layer_reuse=LayerReuseConfig(k=2, subset="first"), **BASE)
    cfg.save_pretrained(tmp_path)
    back = GenerationConfig.from_pretrained(tmp_path)
    assert LayerReuseConfig.coerce(back.layer_reuse) == LayerReuseConfig(k=2, subset="first")
    _, stats = generate_new_tokens(tiny_model, prompts_of([20]), max_new_tokens=32,
                                   layer_reuse=back.layer_reuse, **BASE)
    assert stats["reuse_layers"] == [1, 2] and stats["layer_calls_skipped"] > 0


@pytest.mark.parametrize("k, mode", [(2, "output"), (3, "output"), (2, "residual"), (3, "residual")])
def test_batch_invariance_with_layer_reuse(tiny_model, k, mode):
    prompts = prompts_of(LENGTHS, seed=2)
    kw = dict(max_new_tokens=96, use_block_cache=True, layer_reuse=LayerReuseConfig(k=k, layers=[1, 2], mode=mode),
              **BASE)
    free = [generate_new_tokens(tiny_model, [p], **kw)[0][0] for p in prompts]
    stops = _stop_ids_in_different_blocks(free)
    assert len(stops) == 3
    kw["eos_token_id"] = stops
    alone = [generate_new_tokens(tiny_model, [p], **kw)[0][0] for p in prompts]
    batched, stats = generate_new_tokens(tiny_model, prompts, **kw)
    pad = tiny_model.generation_config.pad_token_id
    for a, b in zip(alone, batched):
        assert b[: len(a)] == a and all(t == pad for t in b[len(a):])
    assert stats["layer_calls_skipped"] > 0


def test_reuse_entries_are_trimmed_with_finished_rows(tiny_model):
    prompts = prompts_of(LENGTHS, seed=2)
    kw = dict(max_new_tokens=96, use_block_cache=True, layer_reuse=LayerReuseConfig(k=2, layers=[1, 2]), **BASE)
    free = [generate_new_tokens(tiny_model, [p], **kw)[0][0] for p in prompts]
    kw["eos_token_id"] = _stop_ids_in_different_blocks(free)
    runner = LayerStackRunner(tiny_model)
    settings = resolve_settings(GenerationConfig(**kw), tiny_model.generation_config, tiny_model.config,
                                num_layers=runner.num_layers)
    decoder = BlockDiffusionDecoder(runner, settings)
    seen_rows = []
    inner = decoder.engine.denoise

    def checked_denoise(*args, **kwargs):
        cache: BlockDiffusionCache = decoder.engine.cache
        for layer in cache.layers:
            assert layer.keys is None or layer.keys.shape[0] == cache.num_rows
            assert layer.reuse_output is None or (
                layer.reuse_output.shape[0] == layer.reuse_input.shape[0] == cache.num_rows)
        seen_rows.append(cache.num_rows)
        return inner(*args, **kwargs)

    decoder.engine.denoise = checked_denoise
    decoder.decode(prompts)
    assert seen_rows[0] == len(prompts) and min(seen_rows) < len(prompts)
    assert set(decoder.engine.cache.reuse_entry_rows.values()) == {decoder.engine.cache.num_rows}


def _one_block_forward(model, tokens, cache, plan):
    n = tokens.shape[1]
    runner = LayerStackRunner(model)
    rows = torch.arange(tokens.shape[0])
    cache.begin_forward("block", rows=None, row_index=rows)
    allowed = torch.ones(tokens.shape[0], 1, 1, n, dtype=torch.bool)
    return runner.hidden_states(tokens, torch.arange(n)[None], allowed, cache, plan)


@pytest.mark.parametrize("mode", ["output", "residual"])
def test_residual_mode_lets_fresh_tokens_through_reused_layers(tiny_model, mode):
    layers = frozenset({1, 2, 3})  # everything after layer 0 is reused
    tokens = torch.tensor([prompts_of([8], seed=4)[0] + [TINY_MASK] * 24])
    cache = BlockDiffusionCache(4, 1, 32, 32)
    offsets = torch.tensor([0])
    plan = ReusePlan(layer_actions(4, tuple(sorted(layers)), (True,) * len(layers)), residual=mode == "residual", offsets=offsets)
    stored = _one_block_forward(tiny_model, tokens, cache, plan)
    fresh = tokens.clone()
    fresh[0, 10] = 17  # a token unmasked since the store
    plan = ReusePlan(layer_actions(4, tuple(sorted(layers)), (False,) * len(layers)), residual=mode == "residual", offsets=offsets)
    recalled = _one_block_forward(tiny_model, fresh, cache, plan)
    if mode == "output":
        assert torch.equal(recalled, stored)  # the new token cannot influence anything after layer 0
    else:
        assert not torch.allclose(recalled[0, 10], stored[0, 10])
        # The changed position's residual stream carries the new token's layer-0 output forward.
        plain = _one_block_forward(tiny_model, fresh, BlockDiffusionCache(4, 1, 32, 32), None)
        assert not torch.equal(recalled, plain)  # but reuse is still an approximation


def test_recall_falls_back_to_compute_when_the_entry_does_not_cover_the_request(tiny_model):
    """Entries belong to one sub-block and cover the slots stored; anything else computes."""
    runner = LayerStackRunner(tiny_model)
    settings = resolve_settings(GenerationConfig(max_new_tokens=32, layer_reuse=LayerReuseConfig(k=2, layers=[1, 2])),
                                tiny_model.generation_config, tiny_model.config, num_layers=runner.num_layers)
    schedule = BlockDiffusionDecoder(runner, settings).reuse
    schedule.start(3)
    schedule.start_block(3, 0)
    # Serials in block 0: sub-block j is j. Row 0's entries are from sub-block 1's slots 8..16 (a
    # sub-block forward); row 1's layer 1 from sub-block 2's slots, its layer 2 from the whole block.
    schedule.entries = [{1: (1, 8, 16), 2: (1, 8, 16)}, {1: (2, 16, 24), 2: (2, 0, 32)}, {1: (1, 0, 32)}]
    # Every row at step 1 of its sub-block, where k=2 plans a recall of both target layers.
    for state, sub in zip(schedule.rows, [1, 2, 2]):
        state.sub, state.step = sub, 1
    steps = {0: RowStep(ForwardKind.SUB, 1, 4), 1: RowStep(ForwardKind.BLOCK, 2, 4), 2: RowStep(ForwardKind.SUB, 2, 4)}
    decided = schedule.decide(steps, may_repeat=False).actions
    computes = {r: tuple(decided[r][layer] is LayerAction.STORE for layer in (1, 2)) for r in decided}
    assert computes == {
        0: (False, False),  # same sub-block and slots: recall
        1: (True, False),  # a whole-block request: only the whole-block entry covers it
        2: (True, True),  # another sub-block's entry (layer 1) or none (layer 2): compute
    }
    assert all(decided[r][layer] is LayerAction.RECALL for r, layer in ((0, 1), (0, 2), (1, 2)))


def test_explicit_layers_must_leave_one_layer_running(tiny_model):
    """As for `size`: a `layers` list naming every layer of the model is refused before any forward."""
    with pytest.raises(ValueError, match=r"layers lists all 4 layers of the model \(allowed: at most 3"):
        LayerReuseConfig(k=2, layers=[0, 1, 2, 3]).resolve_layers(4)
    assert LayerReuseConfig(k=2, layers=[1, 2, 3]).resolve_layers(4) == (1, 2, 3)
    calls = []
    handle = tiny_model.model.embed_tokens.register_forward_pre_hook(lambda *_: calls.append(1))
    try:
        with pytest.raises(ValueError, match="at least one layer must keep running"):
            tiny_model.generate(torch.tensor([[1, 2, 3]]), max_new_tokens=8,
                                layer_reuse=LayerReuseConfig(k=2, layers=list(range(4))))
    finally:
        handle.remove()
    assert not calls


@pytest.mark.parametrize("layers", [(1,), (2,), (3,), (1, 2), (2, 3), (1, 3)])
def test_an_output_recall_returns_the_stored_forward_whatever_the_layers(tiny_model, layers):
    """In output mode the residual stream after the last reused layer is the stored one, and every layer
    after it reads only that stream and the unchanged prefix: the recall forward equals the store forward."""
    tokens = torch.tensor([prompts_of([8], seed=4)[0] + [TINY_MASK] * 24])
    cache = BlockDiffusionCache(4, 1, 32, 32)
    offsets = torch.tensor([0])
    store = ReusePlan(layer_actions(4, layers, (True,) * len(layers)), residual=False, offsets=offsets)
    stored = _one_block_forward(tiny_model, tokens, cache, store)
    fresh = tokens.clone()
    fresh[0, 10], fresh[0, 20] = 17, 23  # tokens unmasked since the store
    recall = ReusePlan(layer_actions(4, layers, (False,) * len(layers)), residual=False, offsets=offsets)
    assert torch.equal(_one_block_forward(tiny_model, fresh, cache, recall), stored)

