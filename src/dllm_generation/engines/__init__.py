"""Engines execute the decoder's plans: `eager` through transformers' layers, `graphed` with static
buffers and CUDA graphs. `selection` picks one per `generate` call."""

from .selection import release, select_engine

__all__ = ["release", "select_engine"]
