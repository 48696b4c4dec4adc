"""Fast path for the denoising loop: static buffers, fixed shapes per step kind, CUDA graphs.

The plain path (`runner.py` + `cache.py`) calls transformers' decoder layers eagerly for every
forward; at batch 1 a 7B forward is then bound by ~1,500 kernel launches, not by the GPU. The fast
path computes the same function with the same per-row decisions (they are still made by
`BlockDiffusionDecoder`), but:

* **static storage**: K/V, layer-reuse entries and every per-step input live in buffers that are
  allocated once per model (`_Store`) and written in place through index tensors, so a captured
  CUDA graph stays valid for every later step and every later `generate` call of the same shape;
* **one pass per step and reuse mode**: the rows that need a whole-block forward and the rows that
  need a sub-block forward are packed into one token batch for every matrix product (one read of
  the weights), attention runs per group; rows that recall layer-reuse entries share one pass;
* **fixed shapes**: a pass attends over the whole static capacity with a per-row key range mask,
  so its shapes depend only on (block rows, sub-block rows, reuse mode), not on the prefix length;
* **CUDA graphs**: each distinct pass shape is captured once (after one eager run that does the
  real work) and replayed afterwards; choosing tokens, the threshold rule and the block update are
  part of the graph, so a step costs one small host->device copy, one replay and two copies back;
* optionally (`fast_path="compile"`) the per-layer element-wise work is fused by `torch.compile`.

Decisions stay on the host exactly as in the plain path (one device->host read per step), so the
fast path changes no tokens: in float32 on the CPU (`fast_path="eager"`, the same code without
graphs) it reproduces the plain path token for token, with identical statistics.

Where it cannot apply (CPU device, sampling, an unsupported layer type...) `select_fast_path`
returns no engine and the reason, which `generate` logs and reports in `stats["fast_path"]`.
"""

from __future__ import annotations

import logging
import math
import weakref
from collections import OrderedDict
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

logger = logging.getLogger(__name__)

FAST_PATH_MODES = (None, True, False, "eager", "graphs", "compile")
# None/True: "graphs" (CUDA only); "compile" adds torch.compile where Triton is available.
_ENGINES: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()
MAX_GRAPHS = 512  # captured passes kept per model; the least recently replayed one is dropped beyond
MAX_EOS = 16


# ---------------------------------------------------------------------------------------------
# Layer math, written with explicit weights (mirrors transformers' Qwen2/Llama modules op for op)
# ---------------------------------------------------------------------------------------------
def _rms_norm(x, weight, eps: float):
    dtype = x.dtype
    h = x.to(torch.float32)
    variance = h.pow(2).mean(-1, keepdim=True)
    h = h * torch.rsqrt(variance + eps)
    return weight * h.to(dtype)


def _rotate_half(x):
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def _pre_attention(x, ln_w, eps: float, q_w, q_b, k_w, k_b, v_w, v_b, cos, sin,
                   n_heads: int, n_kv: int, head_dim: int):
    h = _rms_norm(x, ln_w, eps)
    q = F.linear(h, q_w, q_b).view(-1, n_heads, head_dim)
    k = F.linear(h, k_w, k_b).view(-1, n_kv, head_dim)
    v = F.linear(h, v_w, v_b).view(-1, n_kv, head_dim)
    q = (q * cos) + (_rotate_half(q) * sin)
    k = (k * cos) + (_rotate_half(k) * sin)
    return q, k, v


def _post_attention(x, a, o_w, o_b, ln_w, eps: float, g_w, g_b, u_w, u_b, d_w, d_b):
    x = x + F.linear(a, o_w, o_b)
    h = _rms_norm(x, ln_w, eps)
    return x + F.linear(F.silu(F.linear(h, g_w, g_b)) * F.linear(h, u_w, u_b), d_w, d_b)


@dataclass(frozen=True)
class _LayerWeights:
    ln1: torch.Tensor
    eps1: float
    q_w: torch.Tensor
    q_b: torch.Tensor | None
    k_w: torch.Tensor
    k_b: torch.Tensor | None
    v_w: torch.Tensor
    v_b: torch.Tensor | None
    o_w: torch.Tensor
    o_b: torch.Tensor | None
    ln2: torch.Tensor
    eps2: float
    g_w: torch.Tensor
    g_b: torch.Tensor | None
    u_w: torch.Tensor
    u_b: torch.Tensor | None
    d_w: torch.Tensor
    d_b: torch.Tensor | None


def _unsupported_layer_reason(runner) -> str | None:
    model = runner.model
    cfg = model.config
    impl = getattr(cfg, "_attn_implementation", "sdpa") or "sdpa"
    if impl not in ("sdpa", "eager"):
        return f"attention implementation {impl!r} (the fast path computes SDPA attention; sdpa/eager models only)"
    if getattr(cfg, "hidden_act", "silu") not in ("silu", "swish"):
        return f"hidden_act {cfg.hidden_act!r} (silu only)"
    if getattr(cfg, "use_sliding_window", False) and getattr(cfg, "sliding_window", None):
        return "sliding-window attention"
    rope = getattr(runner.rotary, "rope_type", "default")
    if rope != "default" or getattr(runner.rotary, "attention_scaling", 1.0) != 1.0:
        return f"rope type {rope!r} (default RoPE only)"
    for i, layer in enumerate(runner.layers):
        attn, mlp = getattr(layer, "self_attn", None), getattr(layer, "mlp", None)
        if attn is None or mlp is None:
            return f"layer {i} ({type(layer).__name__}) has no self_attn/mlp"
        if not all(hasattr(attn, n) for n in ("q_proj", "k_proj", "v_proj", "o_proj", "head_dim", "scaling")):
            return f"layer {i} attention ({type(attn).__name__}) is not a q/k/v/o projection attention"
        if any(hasattr(attn, n) for n in ("q_norm", "k_norm")) or getattr(attn, "sliding_window", None):
            return f"layer {i} attention ({type(attn).__name__}) has q/k norms or a sliding window"
        if not all(hasattr(mlp, n) for n in ("gate_proj", "up_proj", "down_proj")):
            return f"layer {i} MLP ({type(mlp).__name__}) is not a gated MLP"
        for norm_name in ("input_layernorm", "post_attention_layernorm"):
            norm = getattr(layer, norm_name, None)
            if norm is None or not type(norm).__name__.endswith("RMSNorm") or not hasattr(norm, "variance_epsilon"):
                return f"layer {i} {norm_name} is not an RMSNorm"
        if type(layer).__name__ not in ("Qwen2DecoderLayer", "LlamaDecoderLayer"):
            return f"decoder layer type {type(layer).__name__} (Qwen2/Llama layers only)"
    if not type(runner.norm).__name__.endswith("RMSNorm"):
        return "final norm is not an RMSNorm"
    return None


def _layer_weights(layer) -> _LayerWeights:
    a, m = layer.self_attn, layer.mlp
    return _LayerWeights(
        layer.input_layernorm.weight, float(layer.input_layernorm.variance_epsilon),
        a.q_proj.weight, a.q_proj.bias, a.k_proj.weight, a.k_proj.bias, a.v_proj.weight, a.v_proj.bias,
        a.o_proj.weight, a.o_proj.bias,
        layer.post_attention_layernorm.weight, float(layer.post_attention_layernorm.variance_epsilon),
        m.gate_proj.weight, m.gate_proj.bias, m.up_proj.weight, m.up_proj.bias, m.down_proj.weight, m.down_proj.bias,
    )


# ---------------------------------------------------------------------------------------------
# Static storage
# ---------------------------------------------------------------------------------------------
class _Store:
    """Every tensor a pass reads or writes, at fixed addresses (graphs replay against them)."""

    def __init__(self, *, num_layers, rows, capacity, block_size, small_block_size, kv_heads, head_dim,
                 hidden, dtype, device):
        self.rows, self.capacity = rows, capacity
        self.block_size, self.small_block_size = block_size, small_block_size
        self.hidden, self.dtype, self.device = hidden, dtype, device
        kv_shape = (rows, kv_heads, capacity, head_dim)
        self.keys = [torch.zeros(kv_shape, dtype=dtype, device=device) for _ in range(num_layers)]
        self.values = [torch.zeros(kv_shape, dtype=dtype, device=device) for _ in range(num_layers)]
        self.reuse: dict[int, dict[str, torch.Tensor]] = {}
        self.reuse_meta: dict[str, torch.Tensor] | None = None
        t_max = rows * block_size
        # Integer inputs of a pass, one buffer so that one copy fills them (see `_Meta`).
        self.layout = {"rows_T": t_max, "bslot_T": t_max, "rows_b": rows, "rows_s": rows, "rows_R": rows,
                       "offs": rows, "pick": rows * small_block_size, "tags": rows, "start": rows, "end": rows, "P": 1}
        size = sum(self.layout.values())
        self.meta = torch.zeros(size, dtype=torch.long, device=device)
        self.fields: dict[str, torch.Tensor] = {}
        at = 0
        for name, n in self.layout.items():
            self.fields[name] = self.meta[at: at + n]
            at += n
        self.block = torch.zeros(rows, block_size, dtype=torch.long, device=device)
        self.pad = torch.zeros(rows, dtype=torch.long, device=device)
        self.finished = torch.zeros(rows, dtype=torch.bool, device=device)
        self.out_tok = torch.zeros(rows * small_block_size, dtype=torch.long, device=device)
        self.out_conf = torch.zeros(rows * small_block_size, dtype=torch.float32, device=device)
        self.unmask = torch.zeros(rows, small_block_size, dtype=torch.bool, device=device)
        self.ar_cap = torch.arange(capacity, device=device)
        self.ar_sub = torch.arange(small_block_size, device=device)
        self.eos = torch.full((MAX_EOS,), -1, dtype=torch.long, device=device)
        pin = device.type == "cuda"
        # A ring of pinned staging buffers: a slot is reused only after its copy has completed.
        self.staging = [torch.zeros(size, dtype=torch.long, pin_memory=pin) for _ in range(4)]
        self.staging_events: list = [None] * len(self.staging)
        self.staging_next = 0

    def fits(self, rows, capacity, block_size, small_block_size, dtype, device) -> bool:
        return (rows <= self.rows and capacity <= self.capacity and block_size == self.block_size
                and small_block_size == self.small_block_size and dtype == self.dtype and device == self.device)

    def reuse_entry(self, layer: int) -> dict[str, torch.Tensor]:
        entry = self.reuse.get(layer)
        if entry is None:
            if self.reuse_meta is None:
                # Every target layer stores in the same passes with the same rows, tags and slots,
                # so one tag/start/end serves them all (one write per pass instead of one per layer).
                self.reuse_meta = {
                    "reuse_tag": torch.full((self.rows,), -1, dtype=torch.long, device=self.device),
                    "reuse_start": torch.zeros(self.rows, dtype=torch.long, device=self.device),
                    "reuse_end": torch.zeros(self.rows, dtype=torch.long, device=self.device),
                }
            shape = (self.rows, self.block_size, self.hidden)
            entry = {
                "reuse_output": torch.zeros(shape, dtype=self.dtype, device=self.device),
                "reuse_input": torch.zeros(shape, dtype=self.dtype, device=self.device),
                **self.reuse_meta,
            }
            self.reuse[layer] = entry
        return entry

    def upload(self, values: dict[str, np.ndarray]) -> None:
        """Fill the meta buffer (fields not given keep stale values that the pass never reads)."""
        i = self.staging_next
        self.staging_next = (i + 1) % len(self.staging)
        host = self.staging[i]
        if self.staging_events[i] is not None:
            self.staging_events[i].synchronize()
        arr = host.numpy()
        at = 0
        for name, n in self.layout.items():
            v = values.get(name)
            if v is not None:
                arr[at: at + len(v)] = v
            at += n
        self.meta.copy_(host, non_blocking=True)
        if self.device.type == "cuda":
            ev = torch.cuda.Event()
            ev.record()
            self.staging_events[i] = ev


def _static_cache_class():
    from .cache import BlockDiffusionCache

    class StaticBlockDiffusionCache(BlockDiffusionCache):
        """`BlockDiffusionCache` whose tensors are views of the fast path's static buffers.

        Rows leaving the batch are compacted in place (the buffers never move), so captured
        graphs stay valid; everything else behaves like the plain cache.
        """

        def __init__(self, store: _Store, num_layers, batch_size, capacity, block_size, reuse_layers):
            super().__init__(num_layers, batch_size, capacity, block_size)
            self.store = store
            for i, layer in enumerate(self.layers):
                layer.keys = store.keys[i][:batch_size, :, :capacity]
                layer.values = store.values[i][:batch_size, :, :capacity]
                layer.is_initialized = True
            for i in reuse_layers:
                entry = store.reuse_entry(i)
                entry["reuse_tag"].fill_(-1)
                for name, t in entry.items():
                    setattr(self.layers[i], name, t[:batch_size])

        def batch_select_indices(self, indices: torch.Tensor) -> None:
            n = int(indices.shape[0])
            idx = indices.to(self.store.device)
            for i, layer in enumerate(self.layers):
                for name, base in (("keys", self.store.keys[i]), ("values", self.store.values[i])):
                    cur = getattr(layer, name)
                    kept = cur.index_select(0, idx)
                    view = base[:n, :, : self.capacity]
                    view.copy_(kept)
                    setattr(layer, name, view)
                entry = self.store.reuse.get(i)
                if entry is not None and layer.reuse_output is not None:
                    for name in ("reuse_output", "reuse_input"):
                        base = entry[name]
                        base[:n].copy_(getattr(layer, name).index_select(0, idx))
                        setattr(layer, name, base[:n])
            meta = self.store.reuse_meta
            if meta is not None:
                for name, base in meta.items():
                    base[:n].copy_(base[: self.num_rows].index_select(0, idx))
                for layer in self.layers:
                    if layer.reuse_output is not None:
                        for name, base in meta.items():
                            setattr(layer, name, base[:n])
            self.num_rows = n

        def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
            self.batch_select_indices(beam_idx)

    return StaticBlockDiffusionCache


# ---------------------------------------------------------------------------------------------
# The engine
# ---------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class PassKey:
    """Everything a pass's graph depends on besides the static buffers."""

    rb: int  # rows forwarding their whole block
    rs: int  # rows forwarding their current sub-block
    n_pick: int  # positions whose logits are used per row (sub-block size; 1 for a commit)
    mode: str  # "none" | "store" | "recall" (layer reuse)
    reuse_layers: tuple[int, ...]
    residual: bool
    tail: str  # "denoise": choose + unmask + update block; "commit": greedy next token
    contiguous_b: bool  # block rows are 0..rb-1 (attend to a slice, no gather)
    contiguous_s: bool
    threshold: float
    mask_id: int


class FastPathEngine:
    """Static buffers and captured graphs of one model; see the module docstring."""

    def __init__(self, runner, *, graphs: bool, compile_layers: bool):
        self.graphs_enabled = graphs
        self.compile_layers = compile_layers
        self.graphs: "OrderedDict[PassKey, torch.cuda.CUDAGraph]" = OrderedDict()
        self.pool = None
        self.store: _Store | None = None
        self.captures = 0
        self.capture_seconds = 0.0
        self.replays = 0
        self.eager_passes = 0
        self.graph_failure: str | None = None
        self.compile_failure: str | None = None
        self.compile_checked = False
        self.evictions = 0
        self._runner_ref = None
        self._bind(runner)

    # -- model binding ---------------------------------------------------------------------
    @property
    def runner(self):
        """The current call's runner. Held weakly: the engine is the value of a weak-keyed map
        from the model, so a strong reference to the model would keep both alive forever."""
        runner = self._runner_ref() if self._runner_ref is not None else None
        if runner is None:
            raise RuntimeError("fast path engine used outside a generate call")
        return runner

    @runner.setter
    def runner(self, runner) -> None:
        self._runner_ref = weakref.ref(runner)

    def _bind(self, runner) -> None:
        self.runner = runner
        cfg = runner.model.config
        attn = runner.layers[0].self_attn
        self.n_heads = int(cfg.num_attention_heads)
        self.n_kv = int(getattr(cfg, "num_key_value_heads", None) or cfg.num_attention_heads)
        self.head_dim = int(attn.head_dim)
        self.scaling = float(attn.scaling)
        self.hidden = int(cfg.hidden_size)
        self.weights = [_layer_weights(layer) for layer in runner.layers]
        self.fingerprint = self._fingerprint(runner)
        if self.compile_layers:
            self.pre = torch.compile(_pre_attention, dynamic=True, fullgraph=True)
            self.post = torch.compile(_post_attention, dynamic=True, fullgraph=True)
        else:
            self.pre, self.post = _pre_attention, _post_attention

    @staticmethod
    def _fingerprint(runner):
        params = [runner.embed.weight, runner.lm_head.weight]
        for layer in runner.layers:
            params += [layer.self_attn.q_proj.weight, layer.mlp.down_proj.weight]
        return tuple((p.data_ptr(), tuple(p.shape), p.dtype) for p in params)

    def rebind(self, runner) -> None:
        """Follow the runner of a new generate call; drop graphs if any weight moved."""
        if self._fingerprint(runner) != self.fingerprint:
            self.reset()
            self._bind(runner)
        else:
            self.runner = runner

    def reset(self) -> None:
        self.graphs.clear()
        self.store = None
        self.pool = None

    # -- per call ----------------------------------------------------------------------------
    def prepare(self, batch: int, capacity: int, block_size: int, small_block_size: int) -> None:
        """Make sure static buffers fit this call (growing them drops captured graphs)."""
        r = self.runner
        dev, dtype = r.device, r.dtype
        if self.store is not None and self.store.fits(batch, capacity, block_size, small_block_size, dtype, dev):
            return
        rows = batch if self.store is None else max(batch, self.store.rows)
        cap = capacity if self.store is None else max(capacity, self.store.capacity)
        cap = -(-cap // 128) * 128
        self.reset()
        if dev.type == "cuda":
            torch.cuda.empty_cache()
        self.store = _Store(num_layers=r.num_layers, rows=rows, capacity=cap, block_size=block_size,
                            small_block_size=small_block_size, kv_heads=self.n_kv, head_dim=self.head_dim,
                            hidden=self.hidden, dtype=dtype, device=dev)

    def make_cache(self, num_layers, batch, capacity, block_size, reuse_layers):
        cls = _static_cache_class()
        return cls(self.store, num_layers, batch, capacity, block_size, tuple(sorted(reuse_layers)))

    def begin_call(self) -> None:
        self._call_start = (self.captures, self.capture_seconds, self.replays, self.eager_passes)

    def describe(self) -> dict:
        """Mode and this call's counters (graphs captured, replays, passes run eagerly)."""
        c0, s0, r0, e0 = getattr(self, "_call_start", (0, 0.0, 0, 0))
        return {"mode": "compile" if self.compile_layers else ("graphs" if self.graphs_enabled else "eager"),
                "graphs_held": len(self.graphs), "captures": self.captures - c0,
                "capture_seconds": round(self.capture_seconds - s0, 3), "replays": self.replays - r0,
                "eager_passes": self.eager_passes - e0, "graph_failure": self.graph_failure,
                "compile_failure": self.compile_failure, "evictions": self.evictions}

    # -- one pass (the graphed region) -------------------------------------------------------
    def _attend(self, q, keys, values, rows, contiguous: bool, mask):
        r, n = q.shape[0], q.shape[1]
        if contiguous:
            k, v = keys[:r], values[:r]
        else:
            k, v = keys.index_select(0, rows), values.index_select(0, rows)
        group = self.n_heads // self.n_kv
        # Grouped-query attention without repeating K/V: the `group` query heads that share a KV
        # head become extra query rows of that head (the mask is the same for all of them).
        qg = q.transpose(1, 2).reshape(r, self.n_kv, group * n, self.head_dim)
        o = F.scaled_dot_product_attention(qg, k, v, attn_mask=mask, scale=self.scaling)
        return o.reshape(r, self.n_heads, n, self.head_dim).transpose(1, 2).reshape(r * n, self.n_heads * self.head_dim)

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
        cos, sin = cos[0][:, None, :], sin[0][:, None, :]
        limit = prefix + bs
        rows_b, rows_s = f["rows_b"][:rb], f["rows_s"][:rs]
        ar = st.ar_cap
        mask_b = ((ar[None, :] >= st.pad[rows_b][:, None]) & (ar[None, :] < limit))[:, None, None, :] if rb else None
        mask_s = ((ar[None, :] >= st.pad[rows_s][:, None]) & (ar[None, :] < limit))[:, None, None, :] if rs else None
        reuse = frozenset(key.reuse_layers)
        rows_R = f["rows_R"][:n_rows]
        for i, w in enumerate(self.weights):
            if key.mode == "recall" and i in reuse:
                entry = st.reuse[i]
                out = entry["reuse_output"][rows_T, bslot_T]
                if key.residual:
                    out = x + (out - entry["reuse_input"][rows_T, bslot_T])
                x = out
                continue
            x_in = x
            q, k, v = self.pre(x, w.ln1, w.eps1, w.q_w, w.q_b, w.k_w, w.k_b, w.v_w, w.v_b, cos, sin,
                               self.n_heads, self.n_kv, self.head_dim)
            st.keys[i][rows_T, :, slot_T] = k
            st.values[i][rows_T, :, slot_T] = v
            parts = []
            if rb:
                parts.append(self._attend(q[:tb].view(rb, bs, self.n_heads, self.head_dim), st.keys[i], st.values[i],
                                          rows_b, key.contiguous_b, mask_b))
            if rs:
                parts.append(self._attend(q[tb:].view(rs, sbs, self.n_heads, self.head_dim), st.keys[i], st.values[i],
                                          rows_s, key.contiguous_s, mask_s))
            a = parts[0] if len(parts) == 1 else torch.cat(parts, dim=0)
            x = self.post(x, a, w.o_w, w.o_b, w.ln2, w.eps2, w.g_w, w.g_b, w.u_w, w.u_b, w.d_w, w.d_b)
            if key.mode == "store" and i in reuse:
                entry = st.reuse[i]
                entry["reuse_output"][rows_T, bslot_T] = x
                if key.residual:  # only residual recalls read the stored input
                    entry["reuse_input"][rows_T, bslot_T] = x_in
        if key.mode == "store":
            st.reuse_meta["reuse_tag"][rows_R] = f["tags"][:n_rows]
            st.reuse_meta["reuse_start"][rows_R] = f["start"][:n_rows]
            st.reuse_meta["reuse_end"][rows_R] = f["end"][:n_rows]
        picked = x[f["pick"][: n_rows * key.n_pick]]
        logits = runner.logits(runner.norm(picked))
        # As sampling.choose_tokens: softmax over the whole vocabulary, mask token included; the
        # mask token is then never chosen.
        probs = torch.softmax(logits, dim=-1)
        probs[:, key.mask_id] = 0.0
        conf, tok = probs.max(dim=-1)
        if key.tail == "commit":
            st.out_tok[:n_rows].copy_(tok)
            return
        # Choose, threshold and write back (as BlockDiffusionDecoder._denoise does).
        tok, conf = tok.view(n_rows, sbs), conf.view(n_rows, sbs)
        slots = f["offs"][:n_rows, None] + st.ar_sub
        current = st.block[rows_R[:, None], slots]
        is_masked = current == key.mask_id
        conf = torch.where(is_masked, conf, torch.full_like(conf, -math.inf))
        unmask = (conf > key.threshold) | (st.ar_sub[None, :] == conf.argmax(dim=-1, keepdim=True))
        unmask = unmask & is_masked
        st.block[rows_R[:, None], slots] = torch.where(unmask, tok, current)
        stop = (unmask & (tok[..., None] == st.eos).any(-1)).any(dim=-1)
        st.finished[rows_R] = st.finished[rows_R] | stop
        st.unmask[:n_rows].copy_(unmask)

    def _run(self, key: PassKey) -> None:
        graph = self.graphs.get(key)
        if graph is not None:
            graph.replay()
            self.graphs.move_to_end(key)
            self.replays += 1
            return
        # First time: the eager run does the real work (it is also the warm-up the capture needs).
        if self.compile_layers and not self.compile_checked:
            try:
                self._pass(key)  # compiles the layer functions
            except Exception as err:  # compiling is an optimisation: fall back to the plain functions
                self.compile_failure = f"{type(err).__name__}: {str(err)[:500]}"
                logger.warning("fast path: torch.compile failed, continuing without it: %s", self.compile_failure)
                self.pre, self.post = _pre_attention, _post_attention
                self._pass(key)  # idempotent: recomputes and rewrites everything the failed run touched
            self.compile_checked = True
        else:
            self._pass(key)
        self.eager_passes += 1
        if not self.graphs_enabled or self.graph_failure is not None:
            return
        while len(self.graphs) >= MAX_GRAPHS:
            self.graphs.popitem(last=False)
            self.evictions += 1
        import time

        t0 = time.perf_counter()
        try:
            if self.pool is None:
                self.pool = torch.cuda.graph_pool_handle()
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=self.pool):
                self._pass(key)
        except Exception as err:  # capture is an optimisation: keep decoding eagerly
            self.graph_failure = f"{type(err).__name__}: {err}"
            logger.warning("fast path: CUDA graph capture failed, continuing without graphs: %s", self.graph_failure)
            torch.cuda.synchronize()
            return
        self.graphs[key] = graph
        self.captures += 1
        self.capture_seconds += time.perf_counter() - t0

    # -- decoder entry points ------------------------------------------------------------------
    def _constants(self, dec):
        s = dec.s
        return dict(threshold=float(s.threshold), mask_id=int(s.mask_token_id))

    def _sync_state(self, dec, block, pad, finished) -> None:
        st = self.store
        n = block.shape[0]
        st.block[:n].copy_(block)
        st.pad[:n].copy_(pad)
        st.finished[:n].copy_(finished)
        eos = tuple(dec.s.eos_token_ids)
        if getattr(st, "eos_values", None) != eos:
            st.eos.copy_(torch.tensor(list(eos) + [-1] * (MAX_EOS - len(eos)), dtype=torch.long))
            st.eos_values = eos

    def denoise(self, dec, block, pad, finished, groups, sub_idx, block_serial) -> None:
        """One denoising step for every group `((kind, compute), rows)` (as `_denoise` per group)."""
        st = self.store
        bs, sbs = st.block_size, st.small_block_size
        n_rows = block.shape[0]
        prefix = dec.cache.prefix_len
        reuse_layers = tuple(sorted(dec.reuse_layers))
        by_compute: dict[bool, dict[str, list[int]]] = {}
        for (kind, compute), rows in groups:
            by_compute.setdefault(compute, {})[kind] = rows
        self._sync_state(dec, block, pad, finished)
        trace_entries = []
        for compute in sorted(by_compute):
            kinds = by_compute[compute]
            rb_rows, rs_rows = kinds.get("block", []), kinds.get("sub", [])
            rb, rs = len(rb_rows), len(rs_rows)
            rows_np = np.asarray(rb_rows + rs_rows, dtype=np.int64)
            offs = np.asarray([sub_idx[r] * sbs for r in rb_rows + rs_rows], dtype=np.int64)
            offs_b, offs_s = offs[:rb], offs[rb:]
            ar_bs, ar_sbs = np.arange(bs, dtype=np.int64), np.arange(sbs, dtype=np.int64)
            rows_T = np.concatenate([np.repeat(rows_np[:rb], bs), np.repeat(rows_np[rb:], sbs)])
            bslot_T = np.concatenate([np.tile(ar_bs, rb), (offs_s[:, None] + ar_sbs).reshape(-1)])
            pick_b = (np.arange(rb, dtype=np.int64)[:, None] * bs + np.clip(offs_b[:, None] - 1 + ar_sbs, 0, None))
            pick_s = rb * bs + np.arange(rs, dtype=np.int64)[:, None] * sbs + np.clip(ar_sbs - 1, 0, None)
            mode = "none" if not reuse_layers else ("store" if compute else "recall")
            values = {"rows_T": rows_T, "bslot_T": bslot_T, "rows_b": rows_np[:rb], "rows_s": rows_np[rb:],
                      "rows_R": rows_np, "offs": offs, "pick": np.concatenate([pick_b.reshape(-1), pick_s.reshape(-1)]),
                      "P": np.asarray([prefix], dtype=np.int64)}
            if mode == "store":
                kinds_rows = [("block", r) for r in rb_rows] + [("sub", r) for r in rs_rows]
                spans = np.asarray([dec._reuse_span(k, sub_idx[r]) for k, r in kinds_rows], dtype=np.int64)
                values["tags"] = np.asarray([dec._tag(block_serial, sub_idx[r]) for _, r in kinds_rows], dtype=np.int64)
                values["start"], values["end"] = spans[:, 0], spans[:, 1]
            st.upload(values)
            key = PassKey(rb, rs, sbs, mode, reuse_layers if mode != "none" else (), dec.residual, "denoise",
                          rb_rows == list(range(rb)), rb == 0 and rs_rows == list(range(rs)), **self._constants(dec))
            self._run(key)
            self._account(dec, rb, rs, mode, reuse_layers)
            if dec.trace is not None:
                unmask = st.unmask[: rb + rs].tolist()
                for kind, rows, lo in (("block", rb_rows, 0), ("sub", rs_rows, rb)):
                    if not rows:
                        continue
                    unmasked = [[sub_idx[r] * sbs + j for j, u in enumerate(unmask[lo + t]) if u] for t, r in enumerate(rows)]
                    trace_entries.append({"block": block_serial, "rows": [dec._row_ids[r] for r in rows], "kind": kind,
                                      "compute": compute, "sub": [sub_idx[r] for r in rows],
                                      "tokens": bs if kind == "block" else sbs, "unmasked": unmasked})
        if dec.trace is not None:  # the plain path's order: sorted by (kind, compute)
            dec.trace.extend(sorted(trace_entries, key=lambda e: (e["kind"], e["compute"])))
        block.copy_(st.block[:n_rows])
        finished.copy_(st.finished[:n_rows])

    def _account(self, dec, rb, rs, mode, reuse_layers) -> None:
        runs, skips = self.runner.layer_runs, self.runner.layer_skips
        for count, name in ((rb, "block_forwards"), (rs, "sub_block_forwards")):
            if not count:
                continue
            dec.stats.forwards += 1
            setattr(dec.stats, name, getattr(dec.stats, name) + 1)
            for i in range(len(runs)):
                if mode == "recall" and i in reuse_layers:
                    skips[i] += 1
                else:
                    runs[i] += 1

    def commit(self, dec, block, pad) -> torch.Tensor:
        """`BlockDiffusionDecoder._commit`: write the clean block to the prefix, greedy next token."""
        st = self.store
        bs = st.block_size
        n = block.shape[0]
        prefix = dec.cache.prefix_len
        finished = torch.zeros(n, dtype=torch.bool, device=block.device)
        self._sync_state(dec, block, pad, finished)
        rows = np.arange(n, dtype=np.int64)
        st.upload({"rows_T": np.repeat(rows, bs), "bslot_T": np.tile(np.arange(bs, dtype=np.int64), n),
                   "rows_b": rows, "rows_R": rows, "pick": rows * bs + bs - 1, "P": np.asarray([prefix], dtype=np.int64)})
        key = PassKey(n, 0, 1, "none", (), False, "commit", True, False, **self._constants(dec))
        self._run(key)
        next_first = st.out_tok[:n].clone()
        dec.cache.advance(bs)
        dec.stats.forwards += 1
        dec.stats.commit_forwards += 1
        for i in range(len(self.runner.layer_runs)):
            self.runner.layer_runs[i] += 1
        return next_first


def _validate_mode(value):
    if value not in FAST_PATH_MODES:
        raise ValueError(f"fast_path must be one of {list(FAST_PATH_MODES)}, got {value!r}")
    return value


def select_fast_path(model, runner, settings, requested, *, batch: int, capacity: int):
    """(engine or None, description). `requested`: None/True = where safe, False = off,
    "eager" = the fast-path code without CUDA graphs (any device), "graphs", "compile"."""
    _validate_mode(requested)
    if requested is False:
        return None, "off (fast_path=False)"
    forced = requested in ("eager", "graphs", "compile")
    reason = None
    dev = runner.device
    if dev.type != "cuda" and requested != "eager":
        reason = f"device is {dev.type}, not CUDA"
    elif settings.do_sample:
        reason = "sampling (do_sample=True): the fast path covers greedy decoding"
    elif len(settings.eos_token_ids) > MAX_EOS:
        reason = f"more than {MAX_EOS} stop token ids"
    else:
        reason = _unsupported_layer_reason(runner)
    if reason is not None:
        (logger.warning if forced or requested is True else logger.info)("fast path not used: %s", reason)
        return None, f"off ({reason})"
    graphs = requested != "eager"
    # The default is CUDA graphs without torch.compile: in bf16, compiled (fused) element-wise kernels
    # round differently from the plain path and change tokens; graphs alone reproduce the plain path
    # wherever the matrix shapes match. `fast_path="compile"` trades that for ~10-20% more speed.
    compile_layers = requested == "compile"
    engine = _ENGINES.get(model)
    if engine is None or engine.graphs_enabled != graphs or engine.compile_layers != compile_layers:
        engine = FastPathEngine(runner, graphs=graphs, compile_layers=compile_layers)
        _ENGINES[model] = engine
    else:
        engine.rebind(runner)
    try:
        engine.prepare(batch, capacity, settings.block_size, settings.small_block_size)
    except torch.OutOfMemoryError as err:
        engine.reset()
        logger.warning("fast path not used: static buffers do not fit: %s", err)
        return None, "off (static buffers do not fit in device memory)"
    engine.begin_call()
    return engine, engine.describe()["mode"]


def release(model) -> None:
    """Free the fast path's static buffers and graphs held for `model`."""
    engine = _ENGINES.pop(model, None)
    if engine is not None:
        engine.reset()
