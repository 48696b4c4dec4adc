"""Throughput of a run from its per-batch counters (warm-up never among them).

`tokens_per_second` is per device: all tokens over the summed model-call seconds of every
process, so 1 GPU and 4 GPUs give comparable numbers. `aggregate_tokens_per_second` divides by
the busiest process's seconds instead, i.e. what the whole launch delivered.
"""

from __future__ import annotations

from .model_calls import COUNTERS


def summarize_throughput(batches: list[dict], *, token_kind: str, warmup: dict | None) -> dict:
    totals = {name: sum(int(b.get(name) or 0) for b in batches) for name in COUNTERS}
    wall = sum(float(b.get("wall_seconds") or 0.0) for b in batches)
    per_rank: dict[int, float] = {}
    for b in batches:
        per_rank[b.get("rank", 0)] = per_rank.get(b.get("rank", 0), 0.0) + float(b.get("wall_seconds") or 0.0)
    busiest = max(per_rank.values(), default=0.0)
    executed, skipped = totals["layer_calls"], totals["layer_calls_skipped"]
    out = {
        "token_kind": token_kind,
        "tokens": totals["tokens"],
        "generated_tokens": totals["generated_tokens"],
        "wall_seconds": round(wall, 6),
        "tokens_per_second": _ratio(totals["tokens"], wall),
        "forwards": totals["forwards"],
        "tokens_per_forward": _ratio(totals["tokens"], totals["forwards"]),
        "denoising_steps": totals["denoising_steps"],
        "layer_calls": executed,
        "layer_calls_skipped": skipped,
        "layer_skip_fraction": _ratio(skipped, executed + skipped),
        "batches": len(batches),
        "prompts": sum(int(b.get("size") or 0) for b in batches),
        "processes": len(per_rank),
        "aggregate_tokens_per_second": _ratio(totals["tokens"], busiest),
        "timing": "model-call wall clock only (device synchronised); tokenisation, scoring and file I/O excluded",
        "warmup": warmup or {"batches": 0},
    }
    return out


def _ratio(num: float, den: float) -> float | None:
    return round(num / den, 6) if den else None
