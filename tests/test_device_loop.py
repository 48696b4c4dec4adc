"""Repeated steps (plan.Repeat) through the graphed engine's device-loop path, on the CPU.

A device loop (engines/device_loop.py) is a CUDA graph WHILE node: it runs the captured pass, then
again while the flag the pass wrote holds (with a layer-reuse cycle, the cycle's passes in turn).
Here a stand-in with exactly those semantics runs the uncaptured passes, so the engine's side of it (the run count read back from the device, each run's
unmasked slots for the trace) is checked against the eager engine; the real node is checked in
float32 on a GPU by benchmarks/fast_path_agreement.py. Where loops cannot be built, the engine
logs why once and repeats steps from the host.
"""

from __future__ import annotations

import pytest
import torch
from test_fast_path import BASE, COUNTERS, _decode, prompts_of

from dllm_generation import LayerReuseConfig
from dllm_generation.engines import captured, graphed, release
from dllm_generation.engines.device_loop import loop_support


class PassAsGraph:
    """A captured pass's replay semantics: run the pass again."""

    def __init__(self, run):
        self.run = run

    def replay(self):
        self.run()


class HostWhileLoop:
    """The loop's semantics: replay the passes in turn, starting with the first, while the flag the
    last one wrote holds."""

    def __init__(self, graphs, flag):
        self.graphs, self.flag, self.launches, self.runs = list(graphs), flag, 0, 0

    def launch(self):
        self.launches += 1
        run = 0
        while run == 0 or bool(self.flag):
            self.graphs[run % len(self.graphs)].replay()
            run += 1
        self.runs += run

    def close(self, wait=True):
        pass


def pretend_captured(monkeypatch):
    """Every pass counts as captured after its first run (a `PassAsGraph`), so loops get built."""
    real_run = graphed.GraphedEngine._run

    def run(self, key):
        real_run(self, key)
        self.captured.graphs.setdefault(key, PassAsGraph(lambda: self._pass(key)))

    monkeypatch.setattr(graphed.GraphedEngine, "_run", run)


@pytest.fixture
def host_loops(monkeypatch, tiny_model):
    release(tiny_model)  # a fresh engine: no loops from earlier tests
    loops = []

    def make_loop(graphs, flag):
        loops.append(HostWhileLoop(graphs, flag))
        return loops[-1]

    pretend_captured(monkeypatch)
    monkeypatch.setattr(captured, "loop_support", lambda device: None)
    monkeypatch.setattr(captured, "DeviceLoop", make_loop)
    yield loops
    release(tiny_model)


@pytest.mark.parametrize("use_block_cache", [True, False])
def test_device_loop_path_gives_the_eager_tokens_counters_and_trace(tiny_model, host_loops, use_block_cache):
    prompts = prompts_of([5, 40, 64], seed=8)
    cfg = dict(max_new_tokens=64, use_block_cache=use_block_cache, **BASE)
    (out_e, dec_e), (out_g, dec_g) = (_decode(tiny_model, prompts, mode, cfg) for mode in (False, "uncaptured"))
    assert out_g == out_e and dec_g.trace == dec_e.trace
    got, want = dec_g.stats.as_dict(), dec_e.stats.as_dict()
    assert {k: got[k] for k in COUNTERS} == {k: want[k] for k in COUNTERS}
    described = dec_g.engine.describe()
    assert described["device_loop_launches"] == sum(loop.launches for loop in host_loops) > 0
    assert 0 < described["repeated_runs"] < got["denoising_steps"]


@pytest.mark.parametrize("reuse", [LayerReuseConfig(k=2, layers=[1, 2]), LayerReuseConfig(k=3, subset="last", size=1),
                                   LayerReuseConfig(policy="per_layer", layer_k=[2, 3], layers=[0, 2])],
                         ids=lambda c: c.label)
@pytest.mark.parametrize("use_block_cache", [True, False])
def test_reuse_cycles_run_in_device_loops_with_the_eager_tokens_counters_and_trace(tiny_model, host_loops, reuse,
                                                                                   use_block_cache):
    """A step-count schedule chains a sub-block's steps through its cycle of compute and recall
    passes; the tokens, every layer's run and skip counts, and the per-run trace stay the eager
    engine's."""
    cfg = dict(max_new_tokens=64, use_block_cache=use_block_cache, layer_reuse=reuse, **BASE)
    for prompts in (prompts_of([40], seed=5), prompts_of([5, 40, 64], seed=8)):
        (out_e, dec_e), (out_g, dec_g) = (_decode(tiny_model, prompts, mode, cfg) for mode in (False, "uncaptured"))
        assert out_g == out_e and dec_g.trace == dec_e.trace
        got, want = dec_g.stats.as_dict(), dec_e.stats.as_dict()
        assert {k: got[k] for k in COUNTERS} == {k: want[k] for k in COUNTERS}
        assert got["layer_calls_skipped"] > 0
    cycles = [loop for loop in host_loops if len(loop.graphs) > 1]
    assert cycles and sum(loop.runs for loop in cycles) > sum(loop.launches for loop in cycles)


def test_a_drift_schedule_never_chains_its_steps(tiny_model, host_loops):
    """unmask_drift decides from the tokens, so each of its steps needs the host's read."""
    cfg = dict(max_new_tokens=64, layer_reuse=LayerReuseConfig(policy="unmask_drift", tolerance=0.3, layers=[1, 2]),
               **BASE)
    prompts = prompts_of([40], seed=5)
    (out_e, dec_e), (out_g, dec_g) = (_decode(tiny_model, prompts, mode, cfg) for mode in (False, "uncaptured"))
    assert out_g == out_e and dec_g.trace == dec_e.trace
    assert dec_g.engine.describe()["repeated_runs"] == 0 and not host_loops


def test_without_device_loops_the_engine_says_why_once_and_repeats_from_the_host(tiny_model, monkeypatch, caplog):
    reason = "conditional graph nodes unavailable (simulated)"
    release(tiny_model)
    monkeypatch.setattr(captured, "loop_support", lambda device: reason)
    prompts = prompts_of([5, 40], seed=3)
    cfg = dict(max_new_tokens=48, **BASE)
    want, _ = _decode(tiny_model, prompts, False, cfg)
    pretend_captured(monkeypatch)  # a loop is built only around a captured pass
    with caplog.at_level("WARNING", logger="dllm_generation.engines.captured"):
        got, decoder = _decode(tiny_model, prompts, "uncaptured", cfg)
    assert got == want
    assert decoder.engine.captured.loop_failure == reason and not decoder.engine.captured.loops
    assert decoder.engine.describe()["loop_failure"] == reason
    assert caplog.text.count("device loops unavailable") == 1 and reason in caplog.text


def test_loop_support_gives_a_one_line_reason_where_loops_cannot_run():
    """On a device without CUDA graphs: a reason, not an error."""
    reason = loop_support(torch.device("cpu"))
    assert reason == "device loops need a CUDA device (got cpu)"


@pytest.mark.parametrize("reuse", [None, LayerReuseConfig(k=2, layers=[1, 2]),
                                   LayerReuseConfig(policy="unmask_drift", tolerance=0.3, layers=[1, 2])],
                         ids=lambda c: "none" if c is None else c.label)
def test_chains_are_offered_only_where_a_second_run_can_happen(tiny_model, monkeypatch, reuse):
    """The decoder's leave to repeat (plan.Repeat), seen at the engine: never for a step with a row on
    its sub-block's last masked slot (its first run surely ends the chain), never for unmask_drift;
    with k=2 the cycle alternates compute and recall, starting with the step's own actions."""
    from dllm_generation.engines.eager import EagerEngine
    from dllm_generation.plan import LayerAction

    offered, refused_single = [], []
    real = EagerEngine.denoise

    def denoise(self, step, block, pad, finished, *, want_unmasked=False, repeat=None):
        masked = [int((block[r, p.subs[i] * 8:(p.subs[i] + 1) * 8] == self.settings.mask_token_id).sum())
                  for p in step for i, r in enumerate(p.rows)]
        if repeat is not None:
            offered.append((step, repeat, masked))
        elif min(masked) == 1:
            refused_single.append(step)
        return real(self, step, block, pad, finished, want_unmasked=want_unmasked, repeat=repeat)

    monkeypatch.setattr(EagerEngine, "denoise", denoise)
    cfg = dict(max_new_tokens=64, layer_reuse=reuse, **BASE)
    _decode(tiny_model, prompts_of([40], seed=5), False, cfg)
    assert refused_single
    if reuse is not None and reuse.policy == "unmask_drift":
        assert not offered
        return
    assert offered and all(min(masked) >= 2 for _, _, masked in offered)
    for step, repeat, _ in offered:
        if reuse is None:
            assert repeat.cycle == ()
            continue
        assert len(repeat.cycle) == 2 and repeat.cycle[0] == step[0].actions
        recalls = [LayerAction.RECALL in actions for actions in repeat.cycle]
        assert sorted(recalls) == [False, True]


def test_dropping_a_graph_closes_every_loop_that_holds_it(monkeypatch):
    """Beyond MAX_GRAPHS the least recently replayed pass is dropped, and with it each device loop
    whose body runs it (a cycle's loop holds several passes); loops without it stay."""

    class Loop:
        def __init__(self):
            self.closed = False

        def close(self, wait=True):
            self.closed = True

    passes = captured.CapturedPasses()
    monkeypatch.setattr(captured, "MAX_GRAPHS", 3)
    monkeypatch.setattr(captured.torch.cuda, "synchronize", lambda *args, **kwargs: None)  # no CUDA here
    for key in ("a", "b", "c"):
        passes.graphs[key] = PassAsGraph(lambda: None)
    loops = {("a", "b"): Loop(), ("b", "a"): Loop(), ("b", "c"): Loop(), ("c",): Loop()}
    passes.loops.update(loops)
    passes.graphs.move_to_end("a")  # "b" is now the least recently replayed
    passes.capture("d", lambda: None, keep=False)  # evicts before capturing (which fails without CUDA here)
    assert list(passes.graphs) == ["c", "a"] and passes.evictions == 1
    assert set(passes.loops) == {("c",)}
    assert [keys for keys, loop in loops.items() if loop.closed] == [("a", "b"), ("b", "a"), ("b", "c")]
