"""The graphed engine: static buffers, one packed pass per step, CUDA graphs and device loops.

The eager engine calls transformers' decoder layers for every forward; at batch 1 a 7B forward
is then bound by ~1,500 kernel launches, not by the GPU. This engine executes the same plans with
the same modules, but:

* **static storage** (`static_store.py`): K/V, layer-reuse entries and every per-step input live
  in buffers allocated once per model and written in place through index tensors, so a captured
  CUDA graph stays valid for every later step and every later `generate` call of the same shape;
* **one pass per step and layer actions** (`packed_pass.py`): the rows of a step's whole-block and
  sub-block forwards share every matrix product and one attention call per layer; the step's token
  choice and unmask rule are part of the pass;
* **CUDA graphs** (`captured.py`): each pass shape is captured once, after one uncaptured run that
  does the real work, and replayed, so a step costs one small host->device copy and one replay;
* **the prompt prefill captured** too, per (rows, length), where it is small enough to be bound by
  its kernel launches rather than its matrix products (`PREFILL_GRAPH_TOKENS`);
* **repeated steps on the device** (`device_loop.py`): a step the decoder allows to repeat
  (`plan.Repeat`) computes in its own graph whether it would be planned again, and a CUDA graph
  WHILE node runs it again while so (through the passes of its layer-reuse cycle, if it has one);
  the host reads once per chain;
* by default (`fast_path="compile"`, or `None`) `torch.compile` fuses each layer's element-wise
  work; `fast_path="graphs"` runs the same passes uncompiled.

This module turns the decoder's plans into pass keys and per-step inputs; it decides nothing. In
float32 on the CPU (`fast_path="uncaptured"`: the same passes without graphs) it reproduces the
eager engine token for token, with identical counters and traces.
"""

from __future__ import annotations

import logging
import weakref
from dataclasses import dataclass

import numpy as np
import torch

from ..plan import ForwardKind, LayerAction, Repeat, StepPlan, StepRuns
from .base import Engine
from .captured import CapturedPasses
from .packed_pass import PackedPass, PassKey, attended_keys
from .static_store import StaticBlockDiffusionCache, StaticStore

logger = logging.getLogger(__name__)

# Prefills of at most this many prompt tokens (rows x length) are captured and replayed. Eager, a
# prefill is ~1,500 kernel launches, and below this size the launches, not the matrix products, set
# its time (docs/benchmarks.md, prefill capture); larger ones would gain next to nothing and hold their
# activations in the graphs' pool.
PREFILL_GRAPH_TOKENS = 2048


@dataclass(frozen=True)
class PrefillKey:
    """Everything a captured prefill depends on besides the static buffers."""

    rows: int
    length: int  # prompt slots forwarded (whole blocks)
    mask_id: int


class GraphedEngine(Engine):
    """Static buffers and captured graphs of one model; see the module docstring.

    One instance lives per model (`engines.selection` keeps them) and is bound to each
    `generate` call's runner and settings.
    """

    name = "graphed"

    def __init__(self, runner, settings, *, capture: bool, compile_layers: bool):
        super().__init__(runner, settings)
        self.capture = capture
        self.compile_layers = compile_layers
        self.captured = CapturedPasses()
        self.store: StaticStore | None = None
        self.uncaptured_passes = 0
        self.repeated_runs = 0  # runs of a step after its first, on the device or from the host
        self.prefill_failure: str | None = None  # why prompt prefills run eager (a capture failed)
        self._runner_ref = None
        self._bind_model(runner)

    # -- model binding ---------------------------------------------------------------------
    @property
    def runner(self):
        """The current call's runner. Held weakly: the engine is the value of a weak-keyed map
        from the model, so a strong reference to the model would keep both alive forever."""
        runner = self._runner_ref() if self._runner_ref is not None else None
        if runner is None:
            raise RuntimeError("graphed engine used outside a generate call")
        return runner

    @runner.setter
    def runner(self, runner) -> None:
        self._runner_ref = weakref.ref(runner) if runner is not None else None

    def _bind_model(self, runner) -> None:
        self.runner = runner
        self.packed = PackedPass(runner, compile_layers=self.compile_layers)  # may move projections' storage
        self.fingerprint = self._fingerprint(runner)

    @staticmethod
    def _fingerprint(runner):
        params = [runner.embed.weight, runner.lm_head.weight]
        for layer in runner.layers:
            attn = layer.self_attn
            params += [attn.q_proj.weight, attn.k_proj.weight, attn.v_proj.weight, layer.mlp.down_proj.weight]
        return tuple((p.data_ptr(), tuple(p.shape), p.dtype) for p in params)

    def bind(self, runner, settings, generator=None) -> None:
        """Follow a new generate call; drop graphs if any weight moved."""
        if self._fingerprint(runner) != self.fingerprint:
            self.reset()
            self._bind_model(runner)
        else:
            self.runner = runner
        self.settings = settings
        self.generator = generator
        self._call_start = self._counters()

    def reset(self) -> None:
        self.captured.drop()
        self.store = None

    def prepare(self, batch: int, capacity: int) -> None:
        """Make sure static buffers fit this call (growing them drops captured graphs)."""
        r, s, p = self.runner, self.settings, self.packed
        dev, dtype = r.device, r.dtype
        if self.store is not None and self.store.fits(batch, capacity, s.block_size, s.small_block_size, dtype, dev):
            return
        rows = batch if self.store is None else max(batch, self.store.rows)
        cap = capacity if self.store is None else max(capacity, self.store.capacity)
        cap = -(-cap // 128) * 128
        self.reset()
        if dev.type == "cuda":
            torch.cuda.empty_cache()
        self.store = StaticStore(num_layers=r.num_layers, rows=rows, capacity=cap, block_size=s.block_size,
                                 small_block_size=s.small_block_size, heads=p.n_heads, kv_heads=p.n_kv,
                                 head_dim=p.head_dim, hidden=p.hidden, dtype=dtype, device=dev)

    def start(self, batch: int, capacity: int, reuse_layers: tuple[int, ...] = ()) -> None:
        self.prepare(batch, capacity)
        self.cache = StaticBlockDiffusionCache(self.store, self.runner.num_layers, batch, capacity,
                                               self.settings.block_size, reuse_layers)
        self.store.set_stop_ids(tuple(self.settings.eos_token_ids))

    def _counters(self) -> dict:
        c = self.captured
        return {"captures": c.captures, "capture_seconds": c.capture_seconds, "replays": c.replays,
                "uncaptured_passes": self.uncaptured_passes, "device_loop_launches": c.loop_launches,
                "repeated_runs": self.repeated_runs}

    def describe(self) -> dict:
        """Mode and this call's counters (graphs captured, replays, passes run uncaptured)."""
        start = getattr(self, "_call_start", None) or dict.fromkeys(self._counters(), 0)
        now = self._counters()
        c = self.captured
        return {"mode": self.mode, "graphs_held": len(c.graphs),
                **{name: round(value - start[name], 3) if isinstance(value, float) else value - start[name]
                   for name, value in now.items()},
                "device_loops_held": len(c.loops), "graph_failure": c.graph_failure,
                "compile_failure": self.packed.compile_failure, "loop_failure": c.loop_failure,
                "prefill_failure": self.prefill_failure,
                "evictions": c.evictions, "few_token_gate_up": self.packed.few_token_gate_up}

    @property
    def mode(self) -> str:
        return "compile" if self.compile_layers else ("graphs" if self.capture else "uncaptured")

    # -- the prompt prefill ----------------------------------------------------------------------
    def prefill(self, prefix_tokens: torch.Tensor, pad: torch.Tensor) -> torch.Tensor:
        """The base engine's prefill, through the static prompt buffers, captured after its first
        run for this (rows, length) and replayed from then on, when it is at most
        `PREFILL_GRAPH_TOKENS` tokens."""
        rows, length = prefix_tokens.shape
        if not self.capture or rows * length > PREFILL_GRAPH_TOKENS:
            return super().prefill(prefix_tokens, pad)
        st = self.store
        st.prompt[:rows, :length].copy_(prefix_tokens)
        st.pad[:rows].copy_(pad)
        key = PrefillKey(rows, length, int(self.settings.mask_token_id))
        if not self.captured.replay(key):
            self._prefill_on_buffers(rows, length)
            if self.prefill_failure is None:
                failure = self.captured.capture(key, lambda: self._prefill_on_buffers(rows, length), keep=False,
                                                optional=True)
                if failure is not None and self.captured.graph_failure is None:
                    self.prefill_failure = failure
                    logger.warning("graphed engine: capturing the prompt prefill failed, prefills run eager "
                                   "(the passes keep their graphs): %s", failure)
        self.cache.advance(length)
        return st.out_tok[:rows].clone()

    def _prefill_on_buffers(self, rows: int, length: int) -> None:
        """The prefill's device work, from the static prompt buffers into `out_tok`. The cache's
        prefix length is left as it was, since a replay of the captured work does not move it."""
        st, cache = self.store, self.cache
        prefix_len = cache.prefix_len
        st.out_tok[:rows].copy_(super().prefill(st.prompt[:rows, :length], st.pad[:rows]))
        cache.prefix_len = prefix_len

    # -- running passes --------------------------------------------------------------------------
    def _pass(self, key: PassKey) -> None:
        self.packed.run(key, self.store, self.runner)

    def _run(self, key: PassKey) -> None:
        """Replay the pass's graph; the first time, run it uncaptured (the real work, and the
        warm-up a capture needs), then capture it."""
        if self.captured.replay(key):
            return
        self.packed.run_first(key, self.store, self.runner)
        self.uncaptured_passes += 1
        if self.capture:
            self.captured.capture(key, lambda: self._pass(key), keep=key.repeat)

    def _run_repeated(self, keys: tuple[PassKey, ...]) -> int:
        """Run a repeatable step until `rules.step_repeats` fails, run i as pass `keys[i % len]`;
        return how many runs it took.

        With a device loop the GPU repeats it; otherwise (first use, a pass not yet captured, or no
        device loops here) the host reads the pass's flag after each run."""
        if self.captured.launch_loop(keys):
            runs = int(self.store.fields["runs"].item())
        else:
            runs = 1
            self._run(keys[0])
            while bool(self.store.again):
                self._run(keys[runs % len(keys)])
                runs += 1
            self.captured.add_loop(keys, self.store.again, self.store.device)
        self.repeated_runs += runs - 1
        return runs

    # -- the decoder's requests ------------------------------------------------------------------
    def _key(self, rb, rs, actions, commit, span, repeat=False, residual=False) -> PassKey:
        s = self.settings
        residual = residual and any(action is not LayerAction.RUN for action in actions)
        keys = attended_keys(self.cache.prefix_len + s.block_size, self.store.capacity)
        return PassKey(rb, rs, actions, residual, commit, span, float(s.threshold),
                       int(s.mask_token_id), repeat, keys)

    def _load_state(self, block, pad, finished) -> None:
        st = self.store
        n = block.shape[0]
        st.block[:n].copy_(block)
        st.pad[:n].copy_(pad)
        st.finished[:n].copy_(finished)

    def denoise(self, step: StepPlan, block, pad, finished, *, want_unmasked: bool = False,
                repeat: Repeat | None = None) -> StepRuns:
        st, s = self.store, self.settings
        bs, sbs = s.block_size, s.small_block_size
        n_rows = block.shape[0]
        self._load_state(block, pad, finished)
        # Forwards with the same layer actions share one pass (whole-block rows first).
        passes: dict[tuple, dict[ForwardKind, int]] = {}
        for index, plan in enumerate(step):
            passes.setdefault(plan.actions, {})[plan.kind] = index
        repeats = repeat is not None  # given only where every forward shares its actions: one pass
        runs = 1
        unmasked: list[torch.Tensor | None] = [None] * len(step)
        for actions, by_kind in passes.items():
            block_plan = step[by_kind[ForwardKind.BLOCK]] if ForwardKind.BLOCK in by_kind else None
            sub_plan = step[by_kind[ForwardKind.SUB]] if ForwardKind.SUB in by_kind else None
            rb_rows = list(block_plan.rows) if block_plan else []
            rs_rows = list(sub_plan.rows) if sub_plan else []
            rb, rs = len(rb_rows), len(rs_rows)
            plans = [p for p in (block_plan, sub_plan) if p is not None]
            residual = plans[0].residual
            rows_np = np.asarray(rb_rows + rs_rows, dtype=np.int64)
            sub_start = np.asarray([o for p in plans for o in p.sub_starts(sbs)], dtype=np.int64)
            tok_start = np.asarray([o for p in plans for o in p.token_starts(sbs)], dtype=np.int64)
            rows_T = np.concatenate([np.repeat(rows_np[:rb], bs), np.repeat(rows_np[rb:], sbs)])
            bslot_T = np.concatenate([np.tile(np.arange(bs, dtype=np.int64), rb),
                                      (tok_start[rb:, None] + np.arange(sbs, dtype=np.int64)).reshape(-1)])
            # Each token's slot among its row's queries: its block slot, or, in a pass without
            # whole-block rows, its slot in the sub-block.
            qslot_T = bslot_T if rb else np.tile(np.arange(sbs, dtype=np.int64), rs)
            values = {"rows_T": rows_T, "bslot_T": bslot_T, "qslot_T": qslot_T, "rows_R": rows_np,
                      "sub_start": sub_start, "tok_start": tok_start,
                      "P": np.asarray([self.cache.prefix_len], dtype=np.int64)}
            if repeats:
                values["hold"] = np.asarray([h for p in plans for h in repeat.hold_first(p)], dtype=np.int64)
                values["runs"] = np.zeros(1, dtype=np.int64)
            st.upload(values)
            if repeats:
                cycle = repeat.cycle or (actions,)
                runs = self._run_repeated(tuple(self._key(rb, rs, run_actions, False, n_rows, True, residual)
                                                for run_actions in cycle))
            else:
                self._run(self._key(rb, rs, actions, False, n_rows, residual=residual))
            if want_unmasked:
                result = st.unmask_runs[:runs, : rb + rs].clone() if repeats else st.unmask[None, : rb + rs].clone()
                if block_plan is not None:
                    unmasked[by_kind[ForwardKind.BLOCK]] = result[:, :rb]
                if sub_plan is not None:
                    unmasked[by_kind[ForwardKind.SUB]] = result[:, rb:]
        block.copy_(st.block[:n_rows])
        finished.copy_(st.finished[:n_rows])
        if not want_unmasked:
            return StepRuns(runs)
        return StepRuns(runs, [[masks[run] for masks in unmasked] for run in range(runs)])

    def commit(self, block, pad) -> torch.Tensor:
        st = self.store
        bs = st.block_size
        n = block.shape[0]
        self._load_state(block, pad, torch.zeros(n, dtype=torch.bool, device=block.device))
        rows = np.arange(n, dtype=np.int64)
        slots = np.tile(np.arange(bs, dtype=np.int64), n)
        st.upload({"rows_T": np.repeat(rows, bs), "bslot_T": slots, "qslot_T": slots, "rows_R": rows,
                   "P": np.asarray([self.cache.prefix_len], dtype=np.int64)})
        self._run(self._key(n, 0, (LayerAction.RUN,) * self.runner.num_layers, True, n))
        self.cache.advance(bs)
        return st.out_tok[:n].clone()
