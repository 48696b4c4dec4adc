"""Static storage of the graphed engine: every tensor a captured pass reads or writes, at fixed
addresses, and the `BlockDiffusionCache` view of it that the prompt prefill writes through."""

from __future__ import annotations

import numpy as np
import torch

from ..cache import BlockDiffusionCache

MAX_STOP_IDS = 16


class StaticStore:
    """Every tensor a pass reads or writes, at fixed addresses (graphs replay against them)."""

    def __init__(self, *, num_layers, rows, capacity, block_size, small_block_size, heads, kv_heads, head_dim,
                 hidden, dtype, device):
        self.rows, self.capacity = rows, capacity
        self.block_size, self.small_block_size = block_size, small_block_size
        self.hidden, self.dtype, self.device = hidden, dtype, device
        kv_shape = (rows, kv_heads, capacity, head_dim)
        self.keys = [torch.zeros(kv_shape, dtype=dtype, device=device) for _ in range(num_layers)]
        self.values = [torch.zeros(kv_shape, dtype=dtype, device=device) for _ in range(num_layers)]
        self.reuse: dict[int, dict[str, torch.Tensor]] = {}
        # A pass's queries in the attention's layout, [rows x heads, query slots, head_dim] (a view of
        # its start); slots a pass does not write keep finite stale values whose outputs nobody reads.
        self.queries = torch.zeros(rows * heads * block_size * head_dim, dtype=dtype, device=device)
        t_max = rows * block_size
        # Integer inputs of a pass, one buffer so that one copy fills them.
        self.layout = {"rows_T": t_max, "bslot_T": t_max, "qslot_T": t_max, "rows_R": rows,
                       "tok_start": rows, "sub_start": rows, "P": 1, "hold": rows, "runs": 1}
        size = sum(self.layout.values())
        self.meta = torch.zeros(size, dtype=torch.long, device=device)
        self.fields: dict[str, torch.Tensor] = {}
        at = 0
        for name, n in self.layout.items():
            self.fields[name] = self.meta[at: at + n]
            at += n
        self.block = torch.zeros(rows, block_size, dtype=torch.long, device=device)
        self.prompt = torch.zeros(rows, capacity, dtype=torch.long, device=device)  # a captured prefill's input
        self.pad = torch.zeros(rows, dtype=torch.long, device=device)
        self.finished = torch.zeros(rows, dtype=torch.bool, device=device)
        self.out_tok = torch.zeros(rows, dtype=torch.long, device=device)
        self.unmask = torch.zeros(rows, small_block_size, dtype=torch.bool, device=device)
        # A repeated step (device loop): each run's unmasked slots, and whether to run again.
        self.unmask_runs = torch.zeros(small_block_size, rows, small_block_size, dtype=torch.bool, device=device)
        self.again = torch.zeros(1, dtype=torch.bool, device=device)
        self.ar_cap = torch.arange(capacity, device=device)
        self.ar_sub = torch.arange(small_block_size, device=device)
        self.stop_ids = torch.full((MAX_STOP_IDS,), -1, dtype=torch.long, device=device)
        self.stop_values: tuple[int, ...] | None = None
        pin = device.type == "cuda"
        # A ring of pinned staging buffers: a slot is reused only after its copy has completed.
        self.staging = [torch.zeros(size, dtype=torch.long, pin_memory=pin) for _ in range(4)]
        self.staging_events: list = [None] * len(self.staging)
        self.staging_next = 0

    def fits(self, rows, capacity, block_size, small_block_size, dtype, device) -> bool:
        return (rows <= self.rows and capacity <= self.capacity and block_size == self.block_size
                and small_block_size == self.small_block_size and dtype == self.dtype and device == self.device)

    def reuse_entry(self, layer: int) -> dict[str, torch.Tensor]:
        """The layer's stored output and input (which slots they hold is tracked by the decoder)."""
        entry = self.reuse.get(layer)
        if entry is None:
            shape = (self.rows, self.block_size, self.hidden)
            entry = {"reuse_output": torch.zeros(shape, dtype=self.dtype, device=self.device),
                     "reuse_input": torch.zeros(shape, dtype=self.dtype, device=self.device)}
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
            event = torch.cuda.Event()
            event.record()
            self.staging_events[i] = event

    def set_stop_ids(self, stop_ids: tuple[int, ...]) -> None:
        if self.stop_values != stop_ids:
            self.stop_ids.copy_(torch.tensor(list(stop_ids) + [-1] * (MAX_STOP_IDS - len(stop_ids)), dtype=torch.long))
            self.stop_values = stop_ids


class StaticBlockDiffusionCache(BlockDiffusionCache):
    """`BlockDiffusionCache` whose tensors are views of the static buffers.

    Rows leaving the batch are compacted in place (the buffers never move), so captured graphs
    stay valid; everything else (the prompt prefill through transformers' layers included)
    behaves like the plain cache.
    """

    def __init__(self, store: StaticStore, num_layers, batch_size, capacity, block_size, reuse_layers):
        super().__init__(num_layers, batch_size, capacity, block_size)
        self.store = store
        for i, layer in enumerate(self.layers):
            layer.keys = store.keys[i][:batch_size, :, :capacity]
            layer.values = store.values[i][:batch_size, :, :capacity]
            layer.is_initialized = True
        for i in reuse_layers:
            for name, t in store.reuse_entry(i).items():
                setattr(self.layers[i], name, t[:batch_size])

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        n = int(indices.shape[0])
        idx = indices.to(self.store.device)
        for i, layer in enumerate(self.layers):
            for name, base in (("keys", self.store.keys[i]), ("values", self.store.values[i])):
                kept = getattr(layer, name).index_select(0, idx)
                view = base[:n, :, : self.capacity]
                view.copy_(kept)
                setattr(layer, name, view)
            entry = self.store.reuse.get(i)
            if entry is not None and layer.reuse_output is not None:
                for name in ("reuse_output", "reuse_input"):
                    base = entry[name]
                    base[:n].copy_(getattr(layer, name).index_select(0, idx))
                    setattr(layer, name, base[:n])
        self.num_rows = n

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        self.batch_select_indices(beam_idx)
