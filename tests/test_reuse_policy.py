"""Reuse policies: `unmask_drift` decides per row from unmasked tokens; its limits equal no reuse and fixed k."""

from __future__ import annotations

import pytest
from conftest import generate_new_tokens
from test_layer_reuse import ExecutionCounter, prompts_of, run_decoder
from transformers import GenerationConfig

from dllm_generation import LayerReuseConfig

LENGTHS = [5, 31, 33, 70]
# A low threshold makes the random tiny model unmask a varying number of tokens per step.
KW = dict(max_new_tokens=64, block_size=32, small_block_size=8, threshold=0.4)


def drift(tolerance, max_staleness=None, **kw):
    return LayerReuseConfig(policy="unmask_drift", tolerance=tolerance, max_staleness=max_staleness,
                            layers=[1, 2], **kw)


@pytest.mark.parametrize("use_block_cache", [True, False])
def test_tolerance_zero_and_staleness_one_are_no_reuse(tiny_model, use_block_cache):
    prompts = prompts_of(LENGTHS)
    plain, s0 = generate_new_tokens(tiny_model, prompts, use_block_cache=use_block_cache, **KW)
    for config in (drift(0.0), drift(1.0, max_staleness=1)):
        tokens, stats = generate_new_tokens(tiny_model, prompts, use_block_cache=use_block_cache,
                                            layer_reuse=config, **KW)
        assert tokens == plain
        assert stats["layer_calls"] == s0["layer_calls"] and stats["layer_calls_skipped"] == 0
        assert stats["forwards"] == s0["forwards"]


@pytest.mark.parametrize("k", [2, 3])
def test_tolerance_one_with_staleness_k_is_the_fixed_policy(tiny_model, k):
    prompts = prompts_of(LENGTHS, seed=k)
    fixed, sf = generate_new_tokens(tiny_model, prompts, layer_reuse=LayerReuseConfig(k=k, layers=[1, 2]), **KW)
    adaptive, sa = generate_new_tokens(tiny_model, prompts, layer_reuse=drift(1.0, max_staleness=k), **KW)
    assert adaptive == fixed
    for key in ("forwards", "denoising_steps", "layer_calls", "layer_calls_skipped", "layer_runs", "layer_skips"):
        assert sa[key] == sf[key], key
    assert sf["layer_calls_skipped"] > 0


@pytest.mark.parametrize("tolerance", [0.25, 0.5])
def test_decisions_follow_the_unmasked_share_and_recalled_layers_never_run(tiny_model, tolerance):
    """Replay the rule from the per-forward trace; hooks count the target layers' real executions."""
    prompt = prompts_of([40], seed=7)[0]
    counter = ExecutionCounter(tiny_model)
    try:
        _, decoder = run_decoder(tiny_model, [prompt], use_block_cache=True, layer_reuse=drift(tolerance), **KW)
    finally:
        counter.close()
    trace, stats = decoder.trace, decoder.stats.as_dict()
    sizes = {len(entry["unmasked"][0]) for entry in trace}
    assert len(sizes) > 1, "the test needs steps that unmask different numbers of tokens"
    # A sub-block's steps go on until none of its slots is masked, so the masked count before a step
    # is what that step and the later steps of its sub-block unmask.
    places = [(entry["block"], entry["sub"][0]) for entry in trace]
    sizes_left = [sum(len(e["unmasked"][0]) for e, p in zip(trace[i:], places[i:]) if p == places[i])
                  for i in range(len(trace))]
    expected, current, masked_at_store = [], None, 0
    for where, masked in zip(places, sizes_left):
        compute = where != current or (masked_at_store - masked) / 8 > tolerance  # step 0 of a sub-block computes
        current = where
        if compute:
            masked_at_store = masked
        expected.append(compute)
    assert [entry["compute"] for entry in trace] == expected
    assert False in expected and expected.count(True) > expected.count(False) // 4
    computes = sum(expected)
    other = stats["prefill_forwards"] + stats["commit_forwards"] + len(trace)
    assert counter.attn[0] == counter.mlp[0] == other
    for layer in (1, 2):
        assert counter.attn[layer] == counter.mlp[layer] == other - (len(trace) - computes)
    assert stats["layer_calls_skipped"] == 2 * (len(trace) - computes)


def test_each_row_decides_alone(tiny_model):
    prompts = prompts_of(LENGTHS, seed=11)
    config = drift(0.4, max_staleness=3)
    batched, _ = generate_new_tokens(tiny_model, prompts, layer_reuse=config, **KW)
    alone = [generate_new_tokens(tiny_model, [p], layer_reuse=config, **KW)[0][0] for p in prompts]
    assert [row[: len(a)] for row, a in zip(batched, alone)] == alone


def test_policy_round_trips_through_generation_config(tmp_path):
    config = GenerationConfig(layer_reuse=drift(0.375, max_staleness=4, mode="residual"))
    config.save_pretrained(tmp_path)
    loaded = LayerReuseConfig.coerce(GenerationConfig.from_pretrained(tmp_path).layer_reuse)
    assert loaded == drift(0.375, max_staleness=4, mode="residual")
    assert loaded.label == "drift0.375-s4-layers1_2-residual"
    scheduled = LayerReuseConfig(policy="per_layer", layer_k=[2, 3], subset="last", size=2)
    GenerationConfig(layer_reuse=scheduled).save_pretrained(tmp_path / "per_layer")
    assert LayerReuseConfig.coerce(GenerationConfig.from_pretrained(tmp_path / "per_layer").layer_reuse) == scheduled


@pytest.mark.parametrize(("kwargs", "message"), [
    (dict(policy="adaptive"), "policy must be one of \\['fixed', 'unmask_drift', 'per_layer'\\]"),
    (dict(policy="per_layer"), "layer_k=None is invalid"),
    (dict(policy="per_layer", layer_k=[2, 0]), "layer_k=\\[2, 0\\] is invalid"),
    (dict(policy="per_layer", layer_k=[2, 3], k=2), "k=2 is the fixed policy's period"),
    (dict(policy="per_layer", layer_k=[2, 3], tolerance=0.5), "apply to policy='unmask_drift' only"),
    (dict(k=2, layer_k=[2, 3]), "layer_k applies to policy='per_layer' only"),
    (dict(policy="unmask_drift", tolerance=-0.1), "tolerance=-0.1 is out of range"),
    (dict(policy="unmask_drift"), "tolerance=None is out of range"),
    (dict(policy="unmask_drift", tolerance=0.5, k=2), "k=2 is the fixed policy's period"),
    (dict(policy="unmask_drift", tolerance=0.5, max_staleness=0), "max_staleness=0 is out of range"),
    (dict(k=2, tolerance=0.5), "apply to policy='unmask_drift' only"),
    (dict(k=2, max_staleness=3), "apply to policy='unmask_drift' only"),
])
def test_bad_policy_settings_are_refused_at_config_time(kwargs, message):
    with pytest.raises(ValueError, match=message):
        LayerReuseConfig(**kwargs)


def test_policy_settings_enter_the_run_identity_only_when_used():
    from dllm_generation.eval.options import EvalOptions

    fixed = EvalOptions(task="arith", k=2).validate().identity()
    assert not {"policy", "tolerance", "max_staleness"} & set(fixed)  # folders made before policies still resume
    adaptive = EvalOptions(task="arith", policy="unmask_drift", tolerance=0.5).validate()
    assert adaptive.identity()["tolerance"] == 0.5 and adaptive.config_name().startswith("drift0.5_")
    assert "layer_k" not in adaptive.identity()
    scheduled = EvalOptions(task="arith", policy="per_layer", layer_k=[2, 3]).validate()
    assert scheduled.identity()["layer_k"] == [2, 3] and scheduled.config_name().startswith("ks2.3_")


def test_the_grid_adds_per_layer_cells_and_refuses_bad_schedules_before_running():
    from dllm_generation.eval.grid import grid_options
    from dllm_generation.eval.options import EvalOptions, InvalidOptionError

    base = EvalOptions(task="arith")
    cells = grid_options(base, [1, 2], ["first"], layer_ks=[[1, 2], [2, 3]])
    assert [c.config_name() for c in cells] == ["k1_first0.429_output", "k2_first0.429_output",
                                                 "ks1.2_first0.429_output", "ks2.3_first0.429_output"]
    assert [c.policy for c in cells] == ["fixed", "fixed", "per_layer", "per_layer"]
    with pytest.raises(InvalidOptionError, match="layer_k=\\[2, 0\\] is invalid"):
        grid_options(base, [1], ["first"], layer_ks=[[2, 0]])


# ------------------------------------------------------------------------------ per-layer periods
def per_layer(*ks, **kw):
    return LayerReuseConfig(policy="per_layer", layer_k=list(ks), layers=[1, 2][: len(ks)] if len(ks) < 3 else [1, 2, 3],
                            **kw)


@pytest.mark.parametrize("path", [False, "uncaptured"])
def test_equal_periods_are_the_fixed_policy_and_periods_of_one_are_no_reuse(tiny_model, path):
    prompts = prompts_of(LENGTHS, seed=4)
    plain, s0 = generate_new_tokens(tiny_model, prompts, fast_path=path, **KW)
    ones, s1 = generate_new_tokens(tiny_model, prompts, fast_path=path, layer_reuse=per_layer(1, 1), **KW)
    assert ones == plain and s1["layer_calls"] == s0["layer_calls"] and s1["layer_calls_skipped"] == 0
    fixed, sf = generate_new_tokens(tiny_model, prompts, fast_path=path,
                                    layer_reuse=LayerReuseConfig(k=3, layers=[1, 2]), **KW)
    same, ss = generate_new_tokens(tiny_model, prompts, fast_path=path, layer_reuse=per_layer(3, 3), **KW)
    assert same == fixed
    for key in ("forwards", "layer_calls", "layer_calls_skipped", "layer_runs", "layer_skips"):
        assert ss[key] == sf[key], key


@pytest.mark.parametrize("mode", ["output", "residual"])
def test_each_layer_follows_its_own_period_and_recalled_layers_never_run(tiny_model, mode):
    """Layer 1 every 2 steps, layer 2 every 3: replay each layer's schedule from the trace and count
    real executions with hooks; the graphed engine gives the same tokens and counters."""
    prompt = prompts_of([40], seed=8)[0]
    config = per_layer(2, 3, mode=mode)
    kw = dict(KW, threshold=1.0)  # one token per step: sub-blocks of 8 steps
    counter = ExecutionCounter(tiny_model)
    try:
        out, decoder = run_decoder(tiny_model, [prompt], use_block_cache=True, layer_reuse=config, **kw)
    finally:
        counter.close()
    stats = decoder.stats.as_dict()
    full = stats["prefill_forwards"] + stats["commit_forwards"]
    step_in_sub, seen = [], {}
    for entry in decoder.trace:
        key = (entry["block"], entry["sub"][0])
        step_in_sub.append(seen.get(key, 0))
        seen[key] = seen.get(key, 0) + 1
    for layer, k in ((1, 2), (2, 3)):
        # Replay: compute at steps 0, k, 2k... of each sub-block, and where a whole-block forward
        # would recall an entry that a sub-block forward stored (it covers only the sub-block).
        computes, stored_by = 0, None
        for entry, n in zip(decoder.trace, step_in_sub):
            if n % k == 0 or (entry["kind"] == "block" and stored_by == "sub"):
                computes, stored_by = computes + 1, entry["kind"]
        assert counter.mlp[layer] == counter.attn[layer] == full + computes == stats["layer_runs"][layer], layer
        assert stats["layer_skips"][layer] == len(decoder.trace) - computes > 0
    assert stats["layer_skips"][1] < stats["layer_skips"][2]
    assert counter.mlp[0] == counter.mlp[3] == stats["forwards"]
    graphed, gs = generate_new_tokens(tiny_model, [prompt], use_block_cache=True, layer_reuse=config,
                                      fast_path="uncaptured", **kw)
    assert graphed == out
    for key in ("forwards", "layer_calls", "layer_calls_skipped", "layer_runs", "layer_skips"):
        assert gs[key] == stats[key], key


def test_per_layer_periods_must_match_the_target_layers(tiny_model):
    with pytest.raises(ValueError, match="layer_k has 3 periods but the reuse targets 2 layers"):
        generate_new_tokens(tiny_model, prompts_of([20]), layer_reuse=LayerReuseConfig(
            policy="per_layer", layer_k=[2, 2, 2], layers=[1, 2]), **KW)
    config = LayerReuseConfig(policy="per_layer", layer_k=[2, 4], layers=[1, 3])
    assert config.label == "ks2.4-layers1_3-output"
    assert LayerReuseConfig.coerce(config.to_dict()) == config


# ------------------------------------------------------------------------------ decisions
def _reference_decisions(config, sbs, targets, history):
    """The policies written out for one row, step by step in Python: `history` is [(sub, masked_now)]."""
    out, sub, step, stored_at, masked_at_store = [], None, 0, 0, 0
    for now_sub, masked_now in history:
        if now_sub != sub:
            sub, step = now_sub, 0
        if step == 0:
            computes = [True] * targets
        elif config.policy == "per_layer":
            computes = [step % k == 0 for k in config.layer_k]
        elif config.policy == "fixed":
            computes = [step % config.k == 0] * targets
        else:
            stale = config.max_staleness is not None and step - stored_at >= config.max_staleness
            computes = [stale or (masked_at_store - masked_now) / sbs > config.tolerance] * targets
        if all(computes):
            stored_at, masked_at_store = step, masked_now
        step += 1
        out.append(computes)
    return out


@pytest.mark.parametrize("config", [
    LayerReuseConfig(k=3, layers=[1, 2]),
    LayerReuseConfig(policy="per_layer", layer_k=[2, 3], layers=[1, 2]),
    LayerReuseConfig(policy="unmask_drift", tolerance=0.3, layers=[1, 2]),
    LayerReuseConfig(policy="unmask_drift", tolerance=0.5, max_staleness=2, layers=[1, 2]),
], ids=lambda c: c.label)
def test_decisions_equal_the_rule_written_out_per_row(config):
    """Random walks through sub-blocks for 5 rows at once equal the per-row rule step by step, and a
    step-count policy's `ahead` foretells the decisions of the steps that follow in the sub-block."""
    import random

    from dllm_generation.reuse.policies import make_policy

    rng = random.Random(0)
    sbs, rows, steps = 8, 5, 40
    histories = []
    for _ in range(rows):
        sub, masked, history = 0, sbs, []
        for _ in range(steps):
            history.append((sub, masked))
            masked -= rng.randint(1, 3)
            if masked <= 0:
                sub, masked = sub + 1, sbs
        histories.append(history)
    schedule = make_policy(config, sbs, 2)
    states = [schedule.new_row() for _ in range(rows)]
    got = [[] for _ in range(rows)]
    foretold = [[] for _ in range(rows)]
    for t in range(steps):
        for r in range(rows):
            sub, masked_now = histories[r][t]
            decided = schedule.decide(states[r], sub, masked_now)
            got[r].append(list(decided))
            ahead = schedule.ahead(states[r].step)
            foretold[r].append(None if ahead is None else [list(a) for a in ahead])
            schedule.record(states[r], decided, masked_now)
    for r in range(rows):
        want = _reference_decisions(config, sbs, 2, histories[r])
        assert got[r] == want, r
        if config.policy == "unmask_drift":
            assert all(a is None for a in foretold[r])
            continue
        for t, ahead in enumerate(foretold[r]):
            assert ahead[0] == want[t]
            same_sub = [i for i in range(1, sbs) if t + i < steps and histories[r][t + i][0] == histories[r][t][0]]
            for i in same_sub:  # later steps of the same sub-block follow the cycle
                assert ahead[i % len(ahead)] == want[t + i], (r, t, i)
    assert any(not all(c) for row in got for c in row)  # some recalls happened


@pytest.mark.parametrize("path", [False, "uncaptured"])
def test_no_policy_adds_a_device_read(tiny_model, monkeypatch, path):
    """Reads from the device (`tolist`, `item`) per decode: one per step the host plans, plus a fixed
    few per block, with or without a policy. The graphed engine may chain steps that the decoder lets
    repeat (no reuse, or a step-count schedule); the host plans the others, so reads minus planned
    steps is one number for every schedule."""
    import torch

    reads = []
    for name in ("tolist", "item"):
        real = getattr(torch.Tensor, name)
        monkeypatch.setattr(torch.Tensor, name, lambda self, _real=real: reads.append(1) or _real(self))
    prompt = prompts_of([40], seed=12)
    beyond, chained = {}, {}
    for label, reuse in (("none", None), ("k1", LayerReuseConfig(k=1, layers=[1, 2])),
                         ("fixed", LayerReuseConfig(k=2, layers=[1, 2])), ("drift", drift(0.5)),
                         ("per_layer", per_layer(2, 3))):
        reads.clear()
        _, stats = generate_new_tokens(tiny_model, prompt, use_block_cache=True, layer_reuse=reuse,
                                       fast_path=path, **KW)
        chained[label] = stats["fast_path"]["repeated_runs"] if path else 0
        beyond[label] = len(reads) - (stats["denoising_steps"] - chained[label]), stats["commit_forwards"]
    assert len(set(beyond.values())) == 1, beyond
    if path:
        assert chained["drift"] == 0 and min(chained[label] for label in ("none", "k1", "fixed", "per_layer")) > 0, chained


# ------------------------------------------------------------------------------ one rule for "no reuse"
@pytest.mark.parametrize(("config", "none"), [
    (LayerReuseConfig(k=1, layers=[1, 2]), True),
    (LayerReuseConfig(k=2, layers=[1, 2]), False),
    (LayerReuseConfig(policy="per_layer", layer_k=[1, 1], layers=[1, 2]), True),
    (LayerReuseConfig(policy="per_layer", layer_k=[1, 2], layers=[1, 2]), False),
    (drift(0.0), True),
    (drift(1.0, max_staleness=1), True),
    (drift(0.5), False),
], ids=lambda c: c.label if isinstance(c, LayerReuseConfig) else str(c))
def test_no_reuse_is_one_rule_for_the_library_and_the_eval(tiny_model, config, none):
    """`no_reuse` decides for `generate` (no target layer may recall, nothing is stored) and for the
    eval (no layer_reuse passed at all): per_layer with every period 1 is no reuse, as k=1 is."""
    from dllm_generation.config import resolve_settings
    from dllm_generation.eval.model_calls import reuse_config
    from dllm_generation.eval.options import EvalOptions
    from dllm_generation.reuse import no_reuse

    assert no_reuse(None) and no_reuse(config) is none
    settings = resolve_settings(GenerationConfig(max_new_tokens=32, layer_reuse=config), tiny_model.generation_config,
                                tiny_model.config, num_layers=4)
    assert settings.recalling_layers == (() if none else (1, 2)) and settings.reuse_layers == (1, 2)
    options = EvalOptions(task="arith", **{name: getattr(config, name) for name in
                                           ("k", "layers", "mode", "policy", "tolerance", "max_staleness", "layer_k")})
    assert (reuse_config(options.validate()) is None) is none


def test_per_layer_periods_of_one_decode_as_plain_decoding_and_store_nothing(tiny_model):
    prompts = prompts_of(LENGTHS, seed=6)
    plain, s0 = generate_new_tokens(tiny_model, prompts, **KW)
    ones, s1 = generate_new_tokens(tiny_model, prompts, layer_reuse=per_layer(1, 1), **KW)
    assert ones == plain
    for key in ("forwards", "denoising_steps", "layer_calls", "layer_runs", "layer_skips"):
        assert s1[key] == s0[key], key
    _, decoder = run_decoder(tiny_model, prompts[:1], layer_reuse=per_layer(1, 1), **KW)
    assert decoder.reuse.layers == () and decoder.reuse.policy is None
    assert all(layer.reuse_output is None for layer in decoder.engine.cache.layers)


# ------------------------------------------------------------------------------ one label
def test_library_labels_and_eval_folder_names_come_from_one_function():
    from dllm_generation.eval.options import EvalOptions
    from dllm_generation.reuse import reuse_label

    for config, label, folder in [
        (LayerReuseConfig(k=2, subset="last", size=4), "k2-last4-output", "k2_last4_output"),
        (LayerReuseConfig(k=3, layers=[0, 5], mode="residual"), "k3-layers0_5-residual", "k3_layers0-5_residual"),
        (drift(0.375, max_staleness=4), "drift0.375-s4-layers1_2-output", "drift0.375_s4_layers1-2_output"),
        (LayerReuseConfig(policy="per_layer", layer_k=[2, 3], size=0.5), "ks2.3-first0.5-output", "ks2.3_first0.5_output"),
    ]:
        assert config.label == reuse_label(config) == label
        options = EvalOptions(task="arith", **{name: getattr(config, name) for name in
                                               ("k", "size", "layers", "mode", "policy", "tolerance", "max_staleness",
                                                "layer_k")}, **({"subset": config.subset} if config.subset else {}))
        assert options.validate().config_name() == reuse_label(config, sep="_") == folder


# ------------------------------------------------------------------------------ adding a policy
def test_a_registered_policy_is_selected_by_name_and_runs_on_every_engine(tiny_model):
    """The worked example of docs/layer_reuse.md ("Add a policy"): periods that ramp from 1 to k with
    depth. On layers 1 and 2 with k=3 it is per_layer with periods 1 and 3, token for token."""
    from dllm_generation.reuse import StepCountPolicy, register_policy, unregister_policy

    @register_policy
    class DepthRampPolicy(StepCountPolicy):
        name = "depth_ramp"
        uses_k = True
        summary = "recomputes deeper target layers less often, up to every k steps"

        @classmethod
        def never_recalls(cls, config):
            return config.k == 1

        @classmethod
        def label_parts(cls, config):
            return [f"ramp{config.k}"]

        def layer_periods(self):
            n, k = self.num_targets, self.config.k
            return tuple(1 + j * (k - 1) // max(1, n - 1) for j in range(n))

    try:
        ramp = LayerReuseConfig(policy="depth_ramp", k=3, layers=[1, 2])
        assert ramp.label == "ramp3-layers1_2-output" and not ramp.always_computes
        with pytest.raises(ValueError, match="tolerance and max_staleness apply to policy='unmask_drift' only "
                                             "\\(policy='depth_ramp' recomputes deeper"):
            LayerReuseConfig(policy="depth_ramp", k=3, tolerance=0.5)
        prompts = prompts_of(LENGTHS, seed=9)
        want, ws = generate_new_tokens(tiny_model, prompts, layer_reuse=per_layer(1, 3), **KW)
        assert ws["layer_calls_skipped"] > 0
        for path in (False, "uncaptured"):
            got, gs = generate_new_tokens(tiny_model, prompts, layer_reuse=ramp, fast_path=path, **KW)
            assert got == want, path
            for key in ("forwards", "denoising_steps", "layer_calls", "layer_calls_skipped", "layer_runs", "layer_skips"):
                assert gs[key] == ws[key], (path, key)
    finally:
        unregister_policy("depth_ramp")
    with pytest.raises(ValueError, match="policy must be one of \\['fixed', 'unmask_drift', 'per_layer'\\]"):
        LayerReuseConfig(policy="depth_ramp", k=3)
