"""One pass of the graphed engine: the packed rows of a step through every decoder layer.

The rows of a step's whole-block forward and of its sub-block forward are packed into one token
batch for every matrix product (one read of the weights). Around the attention everything is the
model's own modules (`input_layernorm`, `o_proj`, `post_attention_layernorm`, `mlp`) and
transformers' `apply_rotary_pos_emb`, except that q/k/v run as one matrix product over the
projections' shared storage (`projections.py`; gate/up fused the same way through cuBLAS gained nothing, see
docs/benchmarks.md). This module's own code is the packed attention: one call per layer for every row of the pass, over the
static cache in place, over the first `PassKey.keys` slots (the prefix and block rounded up to one
of a few sizes, `attended_keys`) with a per-row key-range mask, so a pass's shapes depend only on
its `PassKey`, not on the exact prefix. After the last layer's attention only the hidden
states the logits read go on through o_proj and the MLP (8 per row instead of a whole block's 32, which
pays at large batches). The step's token choice and unmask rule
(`rules.py`, the eager engine's own) end the pass, so they are part of its graph.

Compiled passes of at most 32 tokens in half precision on Hopper GPUs take a variant of the layer's
post-attention work whose gate/up product is one small-M Triton kernel over their shared storage
(`small_m_linear.py`); larger passes call the MLP module, whose cuBLAS products win there.

With `compile_layers`, `torch.compile` fuses each layer's element-wise work around the attention,
the placing of its queries and the gathering of its output included (same tokens; the gain is in
docs/benchmarks.md); a compile failure on any pass shape falls back to the plain functions, with a
logged reason.
"""

from __future__ import annotations

import importlib
import logging
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..sampling import choose_tokens
from ..plan import LayerAction
from .projections import fuse_projections
from .rules import prediction_index, step_repeats, unmask_confident
from .small_m_linear import MAX_TOKENS, small_m_linear, support_reason
from .static_store import StaticStore

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class PassKey:
    """Everything a pass's graph depends on besides the static buffers."""

    rb: int  # rows forwarding their whole block
    rs: int  # rows forwarding their current sub-block
    actions: tuple[LayerAction, ...]  # per layer
    residual: bool
    commit: bool  # a block commit: greedy next token from the last slot; otherwise a denoising step
    span: int  # batch rows 0..span-1 attend (rows not in the pass attend too, and are ignored)
    threshold: float
    mask_id: int
    repeat: bool  # a step that may repeat: the pass counts its runs and computes whether to run again
    keys: int  # key slots the attention reads (`attended_keys`); the mask hides those past each row's block


def attended_keys(needed: int, capacity: int) -> int:
    """How many key slots a pass attends when its rows need the first `needed` (the prefix and
    the block): `needed` rounded up to 128, 256, 384, 512, 768, 1024, 1536, 2048, ... and capped
    at the static capacity. The attention's time follows the keys it reads, and the static
    buffers keep the capacity of the largest call so far; a few sizes keep the graphs few."""
    size = 128
    while size < needed:
        power = 1 << (size.bit_length() - 1)
        size = power * 3 // 2 if size == power and size >= 256 else 2 * power
    return min(size, capacity)


def _rotary_function(layer):
    """transformers' `apply_rotary_pos_emb` of the layer's own modeling module."""
    module = importlib.import_module(type(layer.self_attn).__module__)
    return module.apply_rotary_pos_emb


class LayerMath:
    """One decoder layer's work around the packed attention, through the model's own modules:
    its norms, o_proj and MLP, and transformers' `apply_rotary_pos_emb`. q/k/v are one matrix
    product over their shared storage (`fuse_projections`).

    The new keys and values are written into the static cache, and the queries into the
    attention's layout, inside `pre_attention`; the attention's output is gathered back to the
    tokens inside `post_attention`. Under `torch.compile` those writes fuse with the rotary kernel
    and the gather becomes one kernel, instead of separate index and copy kernels per layer.
    """

    def __init__(self, rotary, n_heads: int, n_kv: int, head_dim: int):
        self.rotary = rotary
        self.sizes = (n_heads * head_dim, n_kv * head_dim, n_kv * head_dim)
        self.n_heads, self.n_kv, self.head_dim = n_heads, n_kv, head_dim

    def pre_attention(self, layer, qkv_weight, qkv_bias, x, cos, sin, keys, values, queries, rows, slots,
                      query_rows, query_slots):
        """The keys and values go to `keys`/`values`[rows, :, slots], the queries to
        `queries`[query_rows, query_slots] (the attention's layout; `queries_at`)."""
        h = layer.input_layernorm(x)
        q, k, v = F.linear(h, qkv_weight, qkv_bias).split(self.sizes, dim=-1)
        q = q.reshape(-1, self.n_heads, self.head_dim)
        k = k.reshape(-1, self.n_kv, self.head_dim)
        v = v.reshape(-1, self.n_kv, self.head_dim)
        q, k = self.rotary(q, k, cos, sin, unsqueeze_dim=1)
        keys[rows, :, slots] = k
        values[rows, :, slots] = v
        queries[query_rows, query_slots] = q

    def _attention_output(self, layer, x, attended, query_rows, query_slots):
        """`attended` is the attention's output in the queries' layout; each token takes its own."""
        o = attended[query_rows, query_slots].reshape(x.shape[0], self.n_heads * self.head_dim)
        return x + layer.self_attn.o_proj(o)

    def post_attention(self, layer, x, attended, query_rows, query_slots):
        x = self._attention_output(layer, x, attended, query_rows, query_slots)
        return x + layer.mlp(layer.post_attention_layernorm(x))

    def post_attention_few_tokens(self, layer, gate_up_weight, x, attended, query_rows, query_slots):
        """`post_attention` for at most `MAX_TOKENS` tokens: gate and up as one product of the
        small-M kernel over their shared storage; the activation and down_proj are the MLP's own."""
        x = self._attention_output(layer, x, attended, query_rows, query_slots)
        gate, up = small_m_linear(layer.post_attention_layernorm(x), gate_up_weight).chunk(2, dim=-1)
        return x + layer.mlp.down_proj(layer.mlp.act_fn(gate) * up)

    def queries_at(self, rows: torch.Tensor, slots: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Where each token's heads sit in the attention's [rows x heads, query slots, head_dim]
        layout: ([T, heads] index into its first dimension, [T, 1] slot). Both are new tensors, not
        views of the pass's inputs: the compiled functions then see the same kind of argument when
        the last layer passes only the tokens the logits read."""
        heads = torch.arange(self.n_heads, device=rows.device)
        return rows[:, None] * self.n_heads + heads, slots[:, None].clone()


class PackedPass:
    """The pass of one model: its dimensions, the shared q/k/v storage and the layer functions
    (compiled or plain). Holds no reference to the model itself (only its parameters), so the
    engine that owns it can live in a map keyed weakly by the model."""

    def __init__(self, runner, *, compile_layers: bool):
        cfg = runner.model.config
        attn = runner.layers[0].self_attn
        self.n_heads = int(cfg.num_attention_heads)
        self.n_kv = int(getattr(cfg, "num_key_value_heads", None) or cfg.num_attention_heads)
        self.head_dim = int(attn.head_dim)
        self.scaling = float(attn.scaling)
        self.hidden = int(cfg.hidden_size)
        self.qkv = [fuse_projections((layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj))
                    for layer in runner.layers]
        self.math = LayerMath(_rotary_function(runner.layers[0]), self.n_heads, self.n_kv, self.head_dim)
        self.compile_layers = compile_layers
        self.compile_failure: str | None = None
        self.compiled_once = False  # the first compile is slow, so it is logged
        # Compiled passes of at most `MAX_TOKENS` tokens multiply gate/up with the small-M kernel
        # where it serves the model; `graphs` keeps the eager engine's products, and so its bf16 tokens.
        gate = runner.layers[0].mlp.gate_proj
        biased = any(layer.mlp.gate_proj.bias is not None or layer.mlp.up_proj.bias is not None for layer in runner.layers)
        self.few_tokens_reason = (
            "the layer functions run uncompiled" if not compile_layers
            else "gate/up have biases (the kernel multiplies without)" if biased
            else support_reason(runner.device, runner.dtype, 2 * gate.out_features, gate.in_features))
        self.gate_up = ([fuse_projections((layer.mlp.gate_proj, layer.mlp.up_proj))[0] for layer in runner.layers]
                        if self.few_tokens_reason is None else None)
        self.set_layer_functions(compile_layers)

    def set_layer_functions(self, compiled: bool, **compile_options) -> None:
        """The layer functions, compiled (with `compile_options` for torch.compile; the pass-timing
        benchmark compares variants) or plain."""
        self.post_few = None
        self.both_variants_compiled = not compiled  # plain functions need no warming
        if compiled:
            # Only the sizes that vary between passes are dynamic (`_vary` marks them). Compiling with
            # every size dynamic would let a token count tie with an equal fixed size (the hidden
            # size, the cache's capacity) and compile again at the next pass size.
            self.pre = torch.compile(self.math.pre_attention, fullgraph=True, **compile_options)
            self.post = torch.compile(self.math.post_attention, fullgraph=True, **compile_options)
            if self.gate_up is not None:
                self.post_few = torch.compile(self.math.post_attention_few_tokens, fullgraph=True, **compile_options)
        else:
            self.pre, self.post = self.math.pre_attention, self.math.post_attention

    @property
    def few_token_gate_up(self) -> str:
        """What multiplies gate/up in passes of at most `MAX_TOKENS` tokens (reported by `describe`)."""
        if self.post_few is not None:
            return "small-M kernel"
        return f"the MLP's own products ({self.few_tokens_reason or 'compile failed'})"

    def _post(self, i: int, layer, x, attended, query_rows, query_slots):
        """The layer's work after attention; passes of few tokens take the small-M kernel's variant
        (a separate compiled function, so choosing it adds no guard on the token count)."""
        if self.post_few is not None and not self.both_variants_compiled:
            self._compile_both_variants(i, layer, x, attended, query_rows, query_slots)
        if self.post_few is not None and x.shape[0] <= MAX_TOKENS:
            return self.post_few(layer, self.gate_up[i], x, attended, query_rows, query_slots)
        return self.post(layer, x, attended, query_rows, query_slots)

    def _compile_both_variants(self, i: int, layer, x, attended, query_rows, query_slots) -> None:
        """Compile both variants of the layer's post-attention work on the process's first pass (it
        runs uncaptured), each on tokens of this pass (repeated where the pass has too few), results
        discarded. Compiling the second one later, when a pass first crosses `MAX_TOKENS` tokens,
        would cost about 5 s in the middle of a decode."""
        self.both_variants_compiled = True
        for count in (min(x.shape[0], MAX_TOKENS), MAX_TOKENS + 1):
            pick = torch.arange(count, device=x.device) % x.shape[0]
            sample = (x[pick], query_rows[pick], query_slots[pick])
            for tensor in sample:
                self._vary(tensor)
            self._post(i, layer, sample[0], attended, *sample[1:])

    def run_first(self, key: "PassKey", st: StaticStore, runner) -> None:
        """A pass shape's first run (also the warm-up a capture needs). With compiled layer
        functions this compiles them, or recompiles them for the new shape; if that fails, this
        pass and every later one run the plain functions."""
        if self.compile_layers and self.compile_failure is None:
            if not self.compiled_once:
                logger.info("graphed engine: compiling the layer functions (once per process; the first call "
                            "takes seconds to tens of seconds)")
                self.compiled_once = True
            try:
                self.run(key, st, runner)
            except Exception as err:  # compiling is an optimisation: fall back to the plain functions
                self.compile_failure = f"{type(err).__name__}: {str(err)[:500]}"
                logger.warning("graphed engine: torch.compile failed, continuing without it: %s", self.compile_failure)
                self.set_layer_functions(False)
                self.run(key, st, runner)  # idempotent: recomputes and rewrites everything the failed run touched
        else:
            self.run(key, st, runner)

    def _attend(self, queries, keys, values, mask, span: int, qlen: int):
        """Attention of every row of the pass in one call, over the cache rows 0..span-1 in place.

        `queries` [span x heads, qlen, head_dim] holds whole-block rows in their 32 slots and
        sub-block rows in the slots of their sub-block (a pass without whole-block rows has qlen =
        one sub-block); slots without a token of this pass hold stale queries whose outputs nobody
        reads. So no row's keys are gathered, and a pass that mixes whole-block and sub-block rows is
        one attention, not two. Grouped-query attention without repeating K/V: the query heads
        sharing a KV head are extra query rows of that head. Returns the output in the same layout.
        """
        grouped = queries.view(span, self.n_kv, (self.n_heads // self.n_kv) * qlen, self.head_dim)
        o = F.scaled_dot_product_attention(grouped, keys[:span], values[:span], attn_mask=mask, scale=self.scaling)
        return o.reshape(span * self.n_heads, qlen, self.head_dim)  # a view unless the backend returned a strided layout

    def _vary(self, tensor: torch.Tensor, *dims: int) -> None:
        """Tell torch.compile that these dimensions (token count, rows, query slots) change between
        passes, so one compilation serves every pass size."""
        if self.compile_layers:
            for dim in dims or (0,):
                torch._dynamo.maybe_mark_dynamic(tensor, dim)

    @staticmethod
    def _key_mask(st: StaticStore, pad: torch.Tensor, limit: torch.Tensor, keys: int) -> torch.Tensor:
        """[R, 1, 1, keys] additive mask: 0 on each row's keys (after its padding, before
        `limit`), -inf elsewhere. Made once per pass: given a boolean mask, SDPA would build this
        same mask again in every layer (three more kernels per layer)."""
        ar = st.ar_cap[:keys]
        allowed = (ar[None, :] >= pad[:, None]) & (ar[None, :] < limit)
        mask = torch.zeros(allowed.shape, dtype=st.dtype, device=ar.device)
        return mask.masked_fill_(~allowed, float("-inf"))[:, None, None, :]

    @staticmethod
    def _read_tokens(key: PassKey, st: StaticStore, n_rows: int, device) -> torch.Tensor:
        """Which of the pass's packed tokens the logits read: for a commit, each row's last slot;
        for a step, the hidden state predicting each slot of each row's sub-block (the rule's index
        into the row's own tokens, offset by where the row's tokens sit in the packed batch)."""
        bs, sbs = st.block_size, st.small_block_size
        if key.commit:
            return torch.arange(n_rows, device=device) * bs + bs - 1
        f = st.fields
        row_base = torch.cat([torch.arange(key.rb, device=device) * bs,
                              key.rb * bs + torch.arange(key.rs, device=device) * sbs])
        index = prediction_index(f["sub_start"][:n_rows], f["tok_start"][:n_rows], sbs)
        return (row_base[:, None] + index).reshape(-1)

    def run(self, key: PassKey, st: StaticStore, runner) -> None:
        """One pass: every layer of the packed rows, then the step's token choice and unmask rule
        (or, for a commit, the next block's first token). Everything it reads and writes lives in `st`."""
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
        mask = self._key_mask(st, st.pad[: key.span], prefix + bs, key.keys)
        qlen = bs if rb else sbs
        queries = st.queries[: key.span * self.n_heads * qlen * self.head_dim].view(-1, qlen, self.head_dim)
        query_rows, query_slots = self.math.queries_at(rows_T, f["qslot_T"][:n_tok])
        for tensor in (cos, sin, rows_T, slot_T, query_rows, query_slots):
            self._vary(tensor)
        self._vary(queries, 0, 1)
        rows_R = f["rows_R"][:n_rows]
        read = self._read_tokens(key, st, n_rows, x.device)
        # Every layer's keys and values are written in `pre`; after the last layer's attention only
        # the hidden states the logits read go on through o_proj and the MLP. (Not in a commit: at
        # batch 1 it reads one token, and torch.compile specialises a size of 1, which would compile
        # the layer function a second time; not where the last layer stores or recalls for reuse.)
        trim_last = key.actions[-1] is LayerAction.RUN and not key.commit
        last_layer = len(runner.layers) - 1
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
            self._vary(x)
            self.pre(layer, *self.qkv[i], x, cos, sin, st.keys[i], st.values[i], queries, rows_T, slot_T,
                     query_rows, query_slots)
            attended = self._attend(queries, st.keys[i][:, :, : key.keys], st.values[i][:, :, : key.keys], mask,
                                    key.span, qlen)
            self._vary(attended, 0, 1)
            if trim_last and i == last_layer:
                x, query_rows, query_slots = x[read], query_rows[read], query_slots[read]
                for tensor in (x, query_rows, query_slots):
                    self._vary(tensor)
            x = self._post(i, layer, x, attended, query_rows, query_slots)
            if action is LayerAction.STORE:
                entry = st.reuse[i]
                entry["reuse_output"][rows_T, bslot_T] = x
                if key.residual:  # only residual recalls read the stored input
                    entry["reuse_input"][rows_T, bslot_T] = x_in
        if not trim_last:
            x = x[read]
        if key.commit:
            st.out_tok[:n_rows].copy_(choose_tokens(runner.logits(runner.norm(x)), mask_token_id=key.mask_id)[0])
            return
        tok, conf = choose_tokens(runner.logits(runner.norm(x)), mask_token_id=key.mask_id)
        sub_start = f["sub_start"][:n_rows]
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
