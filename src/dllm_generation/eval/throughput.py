"""Throughput of a run from its per-batch counters (warm-up never among them), in two conventions.

Ours: `tokens_per_second` is per device: generated non-pad tokens over the summed model-call
seconds (device synchronised) of every process, so 1 GPU and 4 GPUs give comparable numbers.
`aggregate_tokens_per_second` divides by the busiest process's seconds instead.

The reference's (`reference`, the fork's `summary.json` fields `tokens_generated`, `total_time_s`,
`tokens_per_s`): tokens counted as its model class counts them (through the end of the EOS block,
post-EOS padding included) over the seconds of the whole generate loop (tokenising, decoding and
detokenising included, scoring and file writes excluded). Loglikelihood tasks have none there.
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
        "fast_path_ran": sorted({str(b["fast_path"]) for b in batches if b.get("fast_path") is not None}),
        "reference": _reference_convention(batches),
    }
    return out


def _reference_convention(batches: list[dict]) -> dict:
    if not batches or any(b.get("reference_tokens") is None for b in batches):
        return {}
    tokens = sum(int(b["reference_tokens"]) for b in batches)
    seconds = sum(float(b.get("loop_seconds") or 0.0) for b in batches)
    return {
        "tokens_generated": tokens,
        "total_time_s": round(seconds, 2),
        "tokens_per_s": round(tokens / seconds, 2) if seconds else None,
        "timing": "whole generate loop per batch (tokenise, decode, detokenise), summed over batches and processes",
    }


def _ratio(num: float, den: float) -> float | None:
    return round(num / den, 6) if den else None
