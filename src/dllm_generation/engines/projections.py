"""Several projections of one input as one matrix product, by giving their parameters one storage."""

from __future__ import annotations

import torch


def _adjacent_view(tensors: list[torch.Tensor]) -> torch.Tensor | None:
    """The tensors as one [sum of rows, ...] view if they already lie back to back in one storage."""
    first = tensors[0]
    at = first.data_ptr()
    for t in tensors:
        if not t.is_contiguous() or t.data_ptr() != at or t.untyped_storage().data_ptr() != first.untyped_storage().data_ptr():
            return None
        at += t.numel() * t.element_size()
    rows = sum(t.shape[0] for t in tensors)
    return first.new_empty(0).set_(first.untyped_storage(), first.storage_offset(), (rows, *first.shape[1:]))


def fuse_projections(linears) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The weights (and biases) of `linears` (q/k/v, or gate/up) as one tensor each, by moving the
    parameters into one storage: they become views of it, so nothing is held twice and every
    module computes exactly what it did. One matrix product then replaces several smaller ones."""
    fused = []
    for name in ("weight", "bias"):
        params = [getattr(linear, name) for linear in linears]
        if any(t is None for t in params):
            fused.append(None)
            continue
        view = _adjacent_view([t.data for t in params])
        if view is None:
            view = torch.cat([t.data for t in params])
            at = 0
            for t in params:
                t.data = view[at: at + t.shape[0]]
                at += t.shape[0]
        fused.append(view)
    return fused[0], fused[1]
