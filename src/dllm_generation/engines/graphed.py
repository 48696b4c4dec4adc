"""The graphed engine: static buffers, one packed pass per step and layer actions, CUDA graphs.

The eager engine calls transformers' decoder layers for every forward; at batch 1 a 7B forward
is then bound by ~1,500 kernel launches, not by the GPU. This engine executes the same plans with
the same modules, but:

* **static storage** (`StaticStore`): K/V, layer-reuse entries and every per-step input live in
  buffers allocated once per model and written in place through index tensors, so a captured CUDA
  graph stays valid for every later step and every later `generate` call of the same shape;
* **one pass per step and layer actions**: the rows of a step's whole-block forward and of its
  sub-block forward are packed into one token batch for every matrix product (one read of the
  weights), and one attention call covers both kinds of rows, over the cache in place (no row's
  keys are gathered). Its packed attention is this engine's own code; everything
  else is the model's modules (`input_layernorm`, `o_proj`, `post_attention_layernorm`, `mlp`)
  and transformers' `apply_rotary_pos_emb`, except that q/k/v run as one matrix product over the
  projections' shared storage (`qkv.py`: measured 0.36-0.43 ms less per 7B forward on an H200
  at 8-40 tokens; gate/up fused the same way gained nothing at 8-40 tokens and lost at 256);
* **fixed shapes**: a pass attends over the whole static capacity with a per-row key-range mask,
  so its shapes depend only on (block rows, sub-block rows, layer actions), not on the prefix;
* **CUDA graphs**: each pass shape is captured once (after one uncaptured run that does the real
  work) and replayed; token choice and the unmask rule (`rules.py`, the eager engine's own) are
  part of the graph, so a step costs one small host->device copy, one replay and the copies back;
* **repeated steps on the device**: a step the decoder allows to repeat (`plan.Repeat`) computes
  in its own graph whether it would be planned again, and a CUDA graph WHILE node
  (`device_loop.py`) runs it again while so: a sub-block's steps follow each other without the
  host, which reads once per chain;
* by default (`fast_path="compile"`, or `None`) `torch.compile` fuses each layer's element-wise
  work; `fast_path="graphs"` runs the same passes uncompiled.

In float32 on the CPU (`fast_path="uncaptured"`: the same passes without graphs) it reproduces
the eager engine token for token, with identical counters and traces.
"""

from __future__ import annotations

import importlib
import logging
import time
import weakref
from collections import OrderedDict
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from ..sampling import choose_tokens
from .base import Engine
from .device_loop import DeviceLoop, loop_support
from .plan import ForwardKind, LayerAction, Repeat, StepPlan, StepRuns
from .qkv import share_qkv_storage
from .rules import prediction_index, step_repeats, unmask_confident
from .static_store import StaticBlockDiffusionCache, StaticStore

logger = logging.getLogger(__name__)

MAX_GRAPHS = 512  # captured passes kept per model; the least recently replayed one is dropped beyond


# ---------------------------------------------------------------------------------------------
# The engine
# ---------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class PassKey:
    """Everything a pass's graph depends on besides the static buffers."""

    rb: int  # rows forwarding their whole block
    rs: int  # rows forwarding their current sub-block
    actions: tuple[LayerAction, ...]  # per layer
    residual: bool
    commit: bool  # a block commit: greedy next token from the last slot; otherwise a denoising step
    span: int  # batch rows 0..span-1 attend (rows not in the pass attend too, and are ignored)
    ordered: bool  # the pass's tokens are rows 0..span-1 in order, one kind: attention needs no scatter
    threshold: float
    mask_id: int
    repeat: bool  # a step that may repeat: the pass counts its runs and computes whether to run again


def _rotary_function(layer):
    """transformers' `apply_rotary_pos_emb` of the layer's own modeling module."""
    module = importlib.import_module(type(layer.self_attn).__module__)
    return module.apply_rotary_pos_emb


class LayerMath:
    """One decoder layer's work around the packed attention, through the model's own modules:
    its norms, o_proj and MLP, and transformers' `apply_rotary_pos_emb`. q/k/v are one matrix
    product over their shared storage (`share_qkv_storage`).

    The new keys and values are written into the static cache inside `pre_attention`, so that
    under `torch.compile` the writes fuse with the rotary kernel instead of running as two more
    kernels per layer.
    """

    def __init__(self, rotary, n_heads: int, n_kv: int, head_dim: int):
        self.rotary = rotary
        self.sizes = (n_heads * head_dim, n_kv * head_dim, n_kv * head_dim)
        self.n_heads, self.n_kv, self.head_dim = n_heads, n_kv, head_dim

    def pre_attention(self, layer, qkv_weight, qkv_bias, x, cos, sin, keys, values, rows, slots):
        """Queries [T, heads, head_dim]; the keys and values go to `keys`/`values`[rows, :, slots]."""
        h = layer.input_layernorm(x)
        q, k, v = F.linear(h, qkv_weight, qkv_bias).split(self.sizes, dim=-1)
        q = q.reshape(-1, self.n_heads, self.head_dim)
        k = k.reshape(-1, self.n_kv, self.head_dim)
        v = v.reshape(-1, self.n_kv, self.head_dim)
        q, k = self.rotary(q, k, cos, sin, unsqueeze_dim=1)
        keys[rows, :, slots] = k
        values[rows, :, slots] = v
        return q

    def post_attention(self, layer, x, attended):
        x = x + layer.self_attn.o_proj(attended)
        return x + layer.mlp(layer.post_attention_layernorm(x))


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
        self.graphs: "OrderedDict[PassKey, torch.cuda.CUDAGraph]" = OrderedDict()
        self.pool = None
        self.store: StaticStore | None = None
        self.captures = 0
        self.capture_seconds = 0.0
        self.replays = 0
        self.uncaptured_passes = 0
        self.graph_failure: str | None = None
        self.compile_failure: str | None = None
        self.evictions = 0
        self.loops: dict[PassKey, DeviceLoop] = {}
        self.loop_failure: str | None = None
        self.loop_launches = 0
        self.repeated_runs = 0  # runs of a step after its first, on the device or from the host
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
        cfg = runner.model.config
        attn = runner.layers[0].self_attn
        self.n_heads = int(cfg.num_attention_heads)
        self.n_kv = int(getattr(cfg, "num_key_value_heads", None) or cfg.num_attention_heads)
        self.head_dim = int(attn.head_dim)
        self.scaling = float(attn.scaling)
        self.hidden = int(cfg.hidden_size)
        self.qkv = [share_qkv_storage(layer.self_attn) for layer in runner.layers]
        self.fingerprint = self._fingerprint(runner)
        self.math = LayerMath(_rotary_function(runner.layers[0]), self.n_heads, self.n_kv, self.head_dim)
        self._set_layer_functions(self.compile_layers)

    def _set_layer_functions(self, compiled: bool) -> None:
        if compiled:
            # Only the token count varies between passes (`_tokens_vary` marks it). Compiling with
            # every size dynamic would let torch's duck sizing tie a token count to an equal fixed
            # size (the hidden size, the cache's capacity) and compile again at the next pass size.
            self.pre = torch.compile(self.math.pre_attention, fullgraph=True)
            self.post = torch.compile(self.math.post_attention, fullgraph=True)
        else:
            self.pre, self.post = self.math.pre_attention, self.math.post_attention

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
        self._call_start = (self.captures, self.capture_seconds, self.replays, self.uncaptured_passes,
                            self.loop_launches, self.repeated_runs)

    def reset(self) -> None:
        self._drop_graphs()
        self.store = None

    def _drop_graphs(self, *, wait: bool = True) -> None:
        """Free every captured graph, its device loop and the graphs' memory pool."""
        for loop in self.loops.values():
            loop.close(wait=wait)
        self.loops.clear()
        self.graphs.clear()
        self.pool = None

    def prepare(self, batch: int, capacity: int) -> None:
        """Make sure static buffers fit this call (growing them drops captured graphs)."""
        r, s = self.runner, self.settings
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
                                 small_block_size=s.small_block_size, kv_heads=self.n_kv, head_dim=self.head_dim,
                                 hidden=self.hidden, dtype=dtype, device=dev)

    def start(self, batch: int, capacity: int) -> None:
        self.prepare(batch, capacity)
        reuse_layers = self.settings.recalling_layers
        self.cache = StaticBlockDiffusionCache(self.store, self.runner.num_layers, batch, capacity,
                                               self.settings.block_size, reuse_layers)
        self.store.set_stop_ids(tuple(self.settings.eos_token_ids))

    def describe(self) -> dict:
        """Mode and this call's counters (graphs captured, replays, passes run uncaptured)."""
        c0, s0, r0, e0, l0, p0 = getattr(self, "_call_start", (0, 0.0, 0, 0, 0, 0))
        return {"mode": self.mode, "graphs_held": len(self.graphs), "captures": self.captures - c0,
                "capture_seconds": round(self.capture_seconds - s0, 3), "replays": self.replays - r0,
                "uncaptured_passes": self.uncaptured_passes - e0, "device_loops_held": len(self.loops),
                "device_loop_launches": self.loop_launches - l0, "repeated_runs": self.repeated_runs - p0,
                "graph_failure": self.graph_failure,
                "compile_failure": self.compile_failure, "loop_failure": self.loop_failure,
                "evictions": self.evictions}

    @property
    def mode(self) -> str:
        return "compile" if self.compile_layers else ("graphs" if self.capture else "uncaptured")

    # -- one pass (the graphed region) -------------------------------------------------------
    def _attend(self, q, queries, keys, values, rows_T, qslot_T, mask, ordered: bool):
        """Attention of every row of the pass in one call, over the cache rows 0..span-1 in place.

        Queries take the layout [span, heads, qlen, head_dim]: whole-block rows fill their 32 slots,
        sub-block rows the slots of their sub-block (a pass without whole-block rows has qlen = one
        sub-block). If the pass's tokens are already in that order this is a transpose; otherwise they
        are scattered into `queries` at (row, slot), and rows without tokens attend with zero
        queries whose outputs nobody reads. Either way no row's keys are gathered, and a pass that
        mixes whole-block and sub-block rows is one attention, not two. Grouped-query attention
        without repeating K/V: the query heads sharing a KV head are extra query rows of that head.
        """
        span, qlen = queries.shape[0], queries.shape[2]
        group_rows = (self.n_heads // self.n_kv) * qlen
        if ordered:
            grouped = q.view(span, qlen, self.n_heads, self.head_dim).transpose(1, 2)
            grouped = grouped.reshape(span, self.n_kv, group_rows, self.head_dim)
        else:
            queries[rows_T, :, qslot_T] = q
            grouped = queries.view(span, self.n_kv, group_rows, self.head_dim)
        o = F.scaled_dot_product_attention(grouped, keys[:span], values[:span], attn_mask=mask, scale=self.scaling)
        o = o.view(span, self.n_heads, qlen, self.head_dim)
        o = o.transpose(1, 2) if ordered else o[rows_T, :, qslot_T]
        return o.reshape(-1, self.n_heads * self.head_dim)

    def _tokens_vary(self, *tensors: torch.Tensor) -> None:
        """Tell torch.compile that dimension 0 (the pass's token count) changes between passes."""
        if self.compile_layers:
            for tensor in tensors:
                torch._dynamo.maybe_mark_dynamic(tensor, 0)

    def _key_mask(self, pad: torch.Tensor, limit: torch.Tensor) -> torch.Tensor:
        """[R, 1, 1, capacity] additive mask: 0 on each row's keys (after its padding, before
        `limit`), -inf elsewhere. Made once per pass: given a boolean mask, SDPA would build this
        same mask again in every layer (three more kernels per layer)."""
        ar = self.store.ar_cap
        allowed = (ar[None, :] >= pad[:, None]) & (ar[None, :] < limit)
        mask = torch.zeros(allowed.shape, dtype=self.store.dtype, device=ar.device)
        return mask.masked_fill_(~allowed, float("-inf"))[:, None, None, :]

    def _pass(self, key: PassKey) -> None:
        st, runner = self.store, self.runner
        bs, sbs = st.block_size, st.small_block_size
        f = st.fields
        rb, rs = key.rb, key.rs
        n_rows = rb + rs
        tb = rb * bs
        n_tok = tb + rs * sbs
        rows_T, bslot_T, prefix = f["rows_T"][:n_tok], f["bslot_T"][:n_tok], f["P"]
        tokens = st.block[rows_T, bslot_T]
        positions = prefix - st.pad[rows_T] + bslot_T
        slot_T = prefix + bslot_T
        x = runner.embed(tokens)
        cos, sin = runner.rotary(x[None], positions[None])
        cos, sin = cos[0], sin[0]
        self._tokens_vary(cos, sin, rows_T, slot_T)
        mask = self._key_mask(st.pad[: key.span], prefix + bs)
        qslot_T = f["qslot_T"][:n_tok]
        qlen = bs if rb else sbs
        queries = (torch.empty if key.ordered else torch.zeros)(key.span, self.n_heads, qlen, self.head_dim,
                                                                 dtype=x.dtype, device=x.device)
        rows_R = f["rows_R"][:n_rows]
        for i, layer in enumerate(runner.layers):
            action = key.actions[i]
            if action is LayerAction.RECALL:
                entry = st.reuse[i]
                out = entry["reuse_output"][rows_T, bslot_T]
                if key.residual:
                    out = x + (out - entry["reuse_input"][rows_T, bslot_T])
                x = out
                continue
            x_in = x
            self._tokens_vary(x)
            q = self.pre(layer, *self.qkv[i], x, cos, sin, st.keys[i], st.values[i], rows_T, slot_T)
            attended = self._attend(q, queries, st.keys[i], st.values[i], rows_T, qslot_T, mask, key.ordered)
            self._tokens_vary(attended)
            x = self.post(layer, x, attended)
            if action is LayerAction.STORE:
                entry = st.reuse[i]
                entry["reuse_output"][rows_T, bslot_T] = x
                if key.residual:  # only residual recalls read the stored input
                    entry["reuse_input"][rows_T, bslot_T] = x_in
        if key.commit:
            last = torch.arange(n_rows, device=x.device) * bs + bs - 1
            st.out_tok[:n_rows].copy_(self.greedy(runner.norm(x[last])))
            return
        # Which packed hidden state predicts each slot of each row's sub-block: the rule's index
        # into the row's own tokens, offset by where the row's tokens sit in the packed batch.
        sub_start, tok_start = f["sub_start"][:n_rows], f["tok_start"][:n_rows]
        row_base = torch.cat([torch.arange(rb, device=x.device) * bs, tb + torch.arange(rs, device=x.device) * sbs])
        pick = (row_base[:, None] + prediction_index(sub_start, tok_start, sbs)).reshape(-1)
        tok, conf = choose_tokens(runner.logits(runner.norm(x[pick])), mask_token_id=key.mask_id)
        slots = sub_start[:, None] + st.ar_sub
        unmask = unmask_confident(st.block, st.finished, rows_R, slots, tok.view(n_rows, sbs),
                                  conf.view(n_rows, sbs), threshold=key.threshold, mask_token_id=key.mask_id,
                                  stop_ids=st.stop_ids)
        st.unmask[:n_rows].copy_(unmask)
        if key.repeat:
            runs = f["runs"]
            st.unmask_runs[:, :n_rows].index_copy_(0, runs, unmask[None])
            runs.add_(1)
            again = step_repeats(st.block, rows_R, sub_start, f["hold"][:n_rows] != 0, small_block_size=sbs,
                                 mask_token_id=key.mask_id)
            st.again.copy_(again & (runs < sbs))

    def _run(self, key: PassKey) -> None:
        graph = self.graphs.get(key)
        if graph is not None:
            graph.replay()
            self.graphs.move_to_end(key)
            self.replays += 1
            return
        # First time: the uncaptured run does the real work (it is also the warm-up the capture needs).
        if self.compile_layers and self.compile_failure is None:
            if not self.graphs and self.uncaptured_passes == 0:
                logger.info("graphed engine: compiling the layer functions (about 10 s, once per process)")
            try:
                self._pass(key)  # compiles the layer functions, or recompiles them for a new shape
            except Exception as err:  # compiling is an optimisation: fall back to the plain functions
                self.compile_failure = f"{type(err).__name__}: {str(err)[:500]}"
                logger.warning("graphed engine: torch.compile failed, continuing without it: %s", self.compile_failure)
                self._set_layer_functions(False)
                self._pass(key)  # idempotent: recomputes and rewrites everything the failed run touched
        else:
            self._pass(key)
        self.uncaptured_passes += 1
        if not self.capture or self.graph_failure is not None:
            return
        while len(self.graphs) >= MAX_GRAPHS:
            dropped, _ = self.graphs.popitem(last=False)
            loop = self.loops.pop(dropped, None)
            if loop is not None:
                loop.close()
            self.evictions += 1
        t0 = time.perf_counter()
        try:
            if self.pool is None:
                self.pool = torch.cuda.graph_pool_handle()
            # A step that may repeat keeps its graph for a device loop to hold as its body.
            keep = key.repeat and self.loop_failure is None
            graph = torch.cuda.CUDAGraph(keep_graph=True) if keep else torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=self.pool):
                self._pass(key)
        except torch.OutOfMemoryError as err:
            # Give back everything captured so far, then keep decoding uncaptured.
            self.graph_failure = f"out of memory while capturing: {str(err)[:300]}"
            self._drop_graphs(wait=False)
            torch.cuda.synchronize()
            torch.cuda.empty_cache()
            logger.warning("graphed engine: %s; graphs freed, continuing without them", self.graph_failure)
            return
        except Exception as err:  # capture is an optimisation: keep decoding uncaptured
            self.graph_failure = f"{type(err).__name__}: {err}"
            logger.warning("graphed engine: CUDA graph capture failed, continuing without graphs: %s", self.graph_failure)
            torch.cuda.synchronize()
            return
        self.graphs[key] = graph
        self.captures += 1
        self.capture_seconds += time.perf_counter() - t0

    def _run_repeated(self, key: PassKey) -> int:
        """Run a repeatable pass until `rules.step_repeats` fails; return how many runs it took.

        With a device loop the GPU repeats it; otherwise (first use, no captured graph, or no
        device loops here) the host reads the pass's flag after each run."""
        loop = self.loops.get(key)
        if loop is not None:
            loop.launch()
            self.loop_launches += 1
            self.graphs.move_to_end(key)
            runs = int(self.store.fields["runs"].item())
        else:
            runs = 1
            self._run(key)
            while bool(self.store.again):
                self._run(key)
                runs += 1
            self._add_loop(key)
        self.repeated_runs += runs - 1
        return runs

    def _add_loop(self, key: PassKey) -> None:
        graph = self.graphs.get(key)
        if graph is None or self.loop_failure is not None:
            return
        reason = loop_support(self.store.device)
        if reason is None:
            try:
                self.loops[key] = DeviceLoop(graph, self.store.again)
                return
            except Exception as err:  # an optimisation: repeat from the host instead
                reason = f"{type(err).__name__}: {str(err)[:300]}"
        self.loop_failure = reason
        logger.warning("graphed engine: device loops unavailable, repeating steps from the host: %s", reason)

    # -- the decoder's requests ------------------------------------------------------------------
    def _key(self, rb, rs, actions, commit, span, ordered, repeat=False) -> PassKey:
        s = self.settings
        residual = self.residual_reuse and any(action is not LayerAction.RUN for action in actions)
        return PassKey(rb, rs, actions, residual, commit, span, ordered, float(s.threshold),
                       int(s.mask_token_id), repeat)

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
        repeats = repeat is not None and len(passes) == 1  # a step of several passes runs once
        runs = 1
        unmasked: list[torch.Tensor | None] = [None] * len(step)
        for actions, by_kind in passes.items():
            block_plan = step[by_kind[ForwardKind.BLOCK]] if ForwardKind.BLOCK in by_kind else None
            sub_plan = step[by_kind[ForwardKind.SUB]] if ForwardKind.SUB in by_kind else None
            rb_rows = list(block_plan.rows) if block_plan else []
            rs_rows = list(sub_plan.rows) if sub_plan else []
            rb, rs = len(rb_rows), len(rs_rows)
            plans = [p for p in (block_plan, sub_plan) if p is not None]
            rows_np = np.asarray(rb_rows + rs_rows, dtype=np.int64)
            sub_start = np.asarray([o for p in plans for o in p.sub_starts(sbs)], dtype=np.int64)
            tok_start = np.asarray([o for p in plans for o in p.token_starts(sbs)], dtype=np.int64)
            rows_T = np.concatenate([np.repeat(rows_np[:rb], bs), np.repeat(rows_np[rb:], sbs)])
            bslot_T = np.concatenate([np.tile(np.arange(bs, dtype=np.int64), rb),
                                      (tok_start[rb:, None] + np.arange(sbs, dtype=np.int64)).reshape(-1)])
            # Each token's slot among its row's queries: its block slot, or without whole-block rows
            # its slot in the sub-block.
            qslot_T = bslot_T if rb else np.tile(np.arange(sbs, dtype=np.int64), rs)
            values = {"rows_T": rows_T, "bslot_T": bslot_T, "qslot_T": qslot_T,
                      "rows_R": rows_np, "sub_start": sub_start, "tok_start": tok_start,
                      "P": np.asarray([self.cache.prefix_len], dtype=np.int64)}
            if repeats:
                values["hold"] = np.asarray([h for p in plans for h in repeat.hold_first(p)], dtype=np.int64)
                values["runs"] = np.zeros(1, dtype=np.int64)
            st.upload(values)
            ordered = (rb == 0 or rs == 0) and rows_np.tolist() == list(range(n_rows))
            key = self._key(rb, rs, actions, False, n_rows, ordered, repeats)
            if repeats:
                runs = self._run_repeated(key)
            else:
                self._run(key)
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
        self._run(self._key(n, 0, (LayerAction.RUN,) * self.runner.num_layers, True, n, True))
        self.cache.advance(bs)
        return st.out_tok[:n].clone()
