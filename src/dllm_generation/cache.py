"""`BlockDiffusionCache`: the single home of every per-layer tensor a diffusion decode keeps.

Layout (per layer, gpt-fast style): one preallocated K/V buffer `[batch, kv_heads, capacity, head_dim]`.
Slots `[0, prefix_len)` hold the committed prefix; slots `[prefix_len, prefix_len + block_size)`
hold the current block's K/V (the block cache). Rows are aligned on block boundaries (shorter
prompts are left-padded by whole blocks), so every row shares `prefix_len`.

Before each forward the runner says what it writes (`begin_forward`):
  * `append`: the tokens occupy slots `[prefix_len, prefix_len + n)` (prefill, block commit);
  * `block`: the whole current block, slots `[prefix_len, prefix_len + block_size)`;
  * `sub`: a sub-block per row at its own offset inside the block.
`update` writes the new K/V there in place and returns the K/V the layer attends to.
`rows` restricts a forward to some batch rows (rows whose state needs another kind of forward).

Layer-reuse entries (stored layer output and input per target layer) live on the same layer
objects, so `batch_select_indices` and `reorder_cache` keep them aligned with the K/V. Which
sub-block and slots an entry holds is known to the decoder from its own plans.
"""

from __future__ import annotations

import torch
from transformers.cache_utils import Cache, CacheLayerMixin


class BlockDiffusionLayer(CacheLayerMixin):
    """One decoder layer's K/V buffer plus its layer-reuse entry."""

    is_compileable = False
    is_croppable = True
    is_sliding = False

    def __init__(self, owner: "BlockDiffusionCache"):
        super().__init__()
        self.owner = owner
        # Layer-reuse entry: [batch, block_size, hidden] output and input, written at the slots of the
        # forward that stored it (the decoder tracks which sub-block and slots each row's entry holds).
        self.reuse_output: torch.Tensor | None = None
        self.reuse_input: torch.Tensor | None = None

    # -- CacheLayerMixin API ----------------------------------------------------------------
    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        o = self.owner
        shape = (o.num_rows, key_states.shape[1], o.capacity, key_states.shape[-1])
        self.keys = torch.zeros(shape, dtype=key_states.dtype, device=key_states.device)
        self.values = torch.zeros(shape, dtype=value_states.dtype, device=value_states.device)
        self.is_initialized = True

    def update(self, key_states, value_states, *args, **kwargs):
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        o = self.owner
        p, n = o.prefix_len, key_states.shape[2]
        rows = o.rows
        if o.kind == "append" or o.kind == "block":
            end = p + n
            if rows is None:
                self.keys[:, :, p:end] = key_states
                self.values[:, :, p:end] = value_states
                return self.keys[:, :, :end], self.values[:, :, :end]
            self.keys[rows, :, p:end] = key_states
            self.values[rows, :, p:end] = value_states
            return self.keys[rows, :, :end], self.values[rows, :, :end]
        if o.kind != "sub":
            raise RuntimeError(f"cache forward kind {o.kind!r} not set; call begin_forward first")
        end = p + o.block_size
        if o.uniform_offset is not None:
            start = p + o.uniform_offset
            if rows is None:
                self.keys[:, :, start : start + n] = key_states
                self.values[:, :, start : start + n] = value_states
                return self.keys[:, :, :end], self.values[:, :, :end]
            self.keys[rows, :, start : start + n] = key_states
            self.values[rows, :, start : start + n] = value_states
            return self.keys[rows, :, :end], self.values[rows, :, :end]
        row_idx = o.row_index[:, None]  # [R, 1]
        slots = p + o.offsets[:, None] + torch.arange(n, device=o.offsets.device)  # [R, n]
        # Advanced indices on dims 0 and 2 put [R, n] first: value layout [R, n, heads, dim].
        self.keys[row_idx, :, slots] = key_states.transpose(1, 2)
        self.values[row_idx, :, slots] = value_states.transpose(1, 2)
        if rows is None:
            return self.keys[:, :, :end], self.values[:, :, :end]
        return self.keys[rows, :, :end], self.values[rows, :, :end]

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.owner.prefix_len + query_length, 0

    def get_seq_length(self) -> int:
        return self.owner.prefix_len

    def get_max_length(self) -> int:
        return self.owner.capacity

    def _tensors(self):
        return ("keys", "values", "reuse_output", "reuse_input")

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        for name in self._tensors():
            t = getattr(self, name)
            if t is not None:
                setattr(self, name, t.index_select(0, indices.to(t.device)))

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        self.batch_select_indices(beam_idx)

    def batch_repeat_interleave(self, repeats: int) -> None:
        for name in self._tensors():
            t = getattr(self, name)
            if t is not None:
                setattr(self, name, t.repeat_interleave(repeats, dim=0))

    def crop(self, tokens_to_remove: int) -> None:
        """Nothing to free: the owner moves `prefix_len` (buffers stay preallocated)."""

    def reset(self) -> None:
        super().reset()
        self.clear_reuse()

    # -- layer reuse ------------------------------------------------------------------------
    def clear_reuse(self) -> None:
        self.reuse_output = self.reuse_input = None

    def store_reuse(self, hidden_in, hidden_out, offsets) -> None:
        """Remember this layer's input/output for the rows and slots of the current forward."""
        o = self.owner
        n, hidden = hidden_out.shape[1], hidden_out.shape[2]
        if self.reuse_output is None:
            self.reuse_output = torch.zeros(o.num_rows, o.block_size, hidden, device=hidden_out.device,
                                            dtype=hidden_out.dtype)
            self.reuse_input = torch.zeros_like(self.reuse_output)
        rows = o.row_index
        slots = offsets[:, None] + torch.arange(n, device=offsets.device)  # [R, n]
        self.reuse_output[rows[:, None], slots] = hidden_out
        self.reuse_input[rows[:, None], slots] = hidden_in

    def recall_reuse(self, hidden_in, offsets, residual: bool) -> torch.Tensor:
        """The stored result for the rows/positions of the current forward (no layer call)."""
        rows = self.owner.row_index
        n = hidden_in.shape[1]
        slots = offsets[:, None] + torch.arange(n, device=offsets.device)
        out = self.reuse_output[rows[:, None], slots]
        if residual:
            out = hidden_in + (out - self.reuse_input[rows[:, None], slots])
        return out


class BlockDiffusionCache(Cache):
    """Prefix K/V + current-block K/V + layer-reuse entries for a block-diffusion decode."""

    def __init__(self, num_layers: int, batch_size: int, capacity: int, block_size: int):
        self.num_rows = batch_size
        self.capacity = capacity
        self.block_size = block_size
        self.prefix_len = 0
        self.kind: str | None = None
        self.rows: torch.Tensor | None = None
        self.row_index: torch.Tensor | None = None
        self.offsets: torch.Tensor | None = None
        self.uniform_offset: int | None = None
        super().__init__(layers=[BlockDiffusionLayer(self) for _ in range(num_layers)])

    def begin_forward(self, kind: str, *, rows: torch.Tensor | None, row_index: torch.Tensor,
                      offsets: torch.Tensor | None = None, uniform_offset: int | None = None) -> None:
        """Declare what the next forward writes: see the module docstring."""
        if kind not in ("append", "block", "sub"):
            raise ValueError(f"unknown cache forward kind {kind!r}")
        self.kind = kind
        self.rows = rows
        self.row_index = row_index
        self.offsets = offsets
        self.uniform_offset = uniform_offset

    def advance(self, n: int) -> None:
        """Commit `n` slots written by the last `append` forward to the prefix."""
        if self.prefix_len + n > self.capacity:
            raise RuntimeError(f"cache capacity {self.capacity} exceeded")
        self.prefix_len += n

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self.prefix_len

    def get_max_length(self, layer_idx: int | None = None) -> int:
        return self.capacity

    def get_mask_sizes(self, query_length: int, layer_idx: int = 0) -> tuple[int, int]:
        return self.prefix_len + query_length, 0

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        """Keep only `indices` rows in every tensor (K/V and reuse entries)."""
        super().batch_select_indices(indices)
        self.num_rows = int(indices.shape[0])

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        super().reorder_cache(beam_idx)
        self.num_rows = int(beam_idx.shape[0])

    def crop(self, tokens_to_remove: int) -> None:
        """Drop committed prefix slots: a negative count removes that many from the end."""
        new_len = self.prefix_len + tokens_to_remove if tokens_to_remove < 0 else tokens_to_remove
        if not 0 <= new_len <= self.prefix_len:
            raise ValueError(f"cannot crop a prefix of {self.prefix_len} slots to {new_len}")
        self.prefix_len = new_len
        self.clear_reuse()

    def reset(self) -> None:
        super().reset()
        self.prefix_len = 0
        self.kind = None

    def clear_reuse(self) -> None:
        for layer in self.layers:
            layer.clear_reuse()

    @property
    def reuse_entry_rows(self) -> dict[int, int]:
        """Rows held by each layer's reuse entry (for tests and debugging)."""
        return {i: l.reuse_output.shape[0] for i, l in enumerate(self.layers) if l.reuse_output is not None}
