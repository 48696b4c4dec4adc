"""The benchmark's printed table: one row per timed run, ratios against the run's own baselines.

Columns: workload, batch, block cache, reuse cell, path; tok/s; tokens per forward (the library's
`tokens_per_forward`: all rows' tokens / forwards); ms per forward; `xfloor` (ms per forward / the
weights-stream floor, when measured); forwards; layer executions; speedup over the same group's
run without reuse, its bound (executions without reuse / executions here) and `of bound` (speedup /
bound); `vs plain` (fast / plain path); `vs AR` (/ transformers' autoregressive generate at the same
batch, when run); `vs ref` (/ the reference sampler, when given); fast-vs-plain token agreement.
"""

from __future__ import annotations


def fast_path_mode(fast_path) -> str | None:
    """A short name for what `stats["fast_path"]` reports (a dict with a mode, or a reason string)."""
    return fast_path.get("mode") if isinstance(fast_path, dict) else fast_path


def _ratio(a, b, fmt="{:.2f}x") -> str:
    return fmt.format(a / b) if a is not None and b else ""


def render_table(results) -> str:
    env = results["environment"]
    runs, ar_runs = results["runs"], results.get("autoregressive", [])
    floor_ms = env.get("weights_floor", {}).get("ms")
    reference = results.get("reference")
    lines = [f"device: {env.get('gpu', env.get('cpu'))} | torch {env['torch']} | transformers {env['transformers']} | "
             f"dtype {env['dtype']} | {env['date']}"]
    if floor_ms:
        f = env["weights_floor"]
        lines.append(f"weights-stream floor: {f['gigabytes']} GB in {f['ms']} ms ({f['gb_per_second']} GB/s); "
                     "xfloor = ms/fwd / floor")
    if results.get("workload"):
        w = results["workload"]
        lines.append(f"target workload: alpha {w['alpha']:.4g}, calibrated {w['tokens_per_forward']:.3f} tokens/forward "
                     f"(target {w['target_tokens_per_forward']}, batch 1); stop ids {w['stop_ids_excluded']} never chosen")
    columns = ["workload", "batch", "cache", "reuse", "path", "tok/s", "tok/fwd", "ms/fwd"]
    columns += ["xfloor"] if floor_ms else []
    columns += ["fwds", "layer execs", "speedup", "bound", "of bound", "vs plain"]
    columns += ["vs AR"] if ar_runs else []
    columns += ["vs ref"] if reference else []
    columns += ["agree"]
    base = {(r["workload"], r["batch"], r["cache"], r["path"]): r for r in runs if r["reuse"] == "none"}
    ar_by_batch = {r["batch"]: r for r in ar_runs}
    rows = []
    for r in runs:
        b = base.get((r["workload"], r["batch"], r["cache"], r["path"]))
        speed = bound = share = ""
        if b is not None and r["reuse"] != "none":
            s = r["tokens_per_second"] / b["tokens_per_second"]
            bd = b["layer_calls"] / r["layer_calls"] if r["layer_calls"] else float("nan")
            speed, bound, share = f"{s:.3f}", f"{bd:.3f}", f"{100 * s / bd:.0f}%"
        plain = base.get((r["workload"], r["batch"], r["cache"], "off"))
        ar = ar_by_batch.get(r["batch"])
        cell = {"workload": r["workload"], "batch": str(r["batch"]), "cache": "on" if r["cache"] else "off",
                "reuse": r["reuse"], "path": r["path"], "tok/s": f"{r['tokens_per_second']:.1f}",
                "tok/fwd": f"{r['tokens_per_forward']:.2f}", "ms/fwd": f"{r['ms_per_forward']:.2f}",
                "xfloor": _ratio(r["ms_per_forward"], floor_ms, "{:.2f}"), "fwds": str(r["forwards"]),
                "layer execs": str(r["layer_calls"]), "speedup": speed, "bound": bound, "of bound": share,
                "vs plain": _ratio(r["tokens_per_second"], plain["tokens_per_second"]) if plain and r["path"] != "off" else "",
                "vs AR": _ratio(r["tokens_per_second"], ar["tokens_per_second"] if ar else None),
                "vs ref": _ratio(r["tokens_per_second"], r.get("reference_tokens_per_second")),
                "agree": f"{r['token_agreement']:.3f}" if "token_agreement" in r else ""}
        rows.append(tuple(cell[c] for c in columns))
    for a in ar_runs:  # one forward per token: ms/fwd is ms per token
        cell = {c: "" for c in columns}
        cell.update({"workload": "-", "batch": str(a["batch"]), "cache": "-", "reuse": "-", "path": a["path"],
                     "tok/s": f"{a['tokens_per_second']:.1f}", "tok/fwd": f"{a['generated_tokens'] / a['forwards']:.2f}",
                     "ms/fwd": f"{a['ms_per_token']:.2f}", "xfloor": _ratio(a["ms_per_token"], floor_ms, "{:.2f}"),
                     "fwds": str(a["forwards"])})
        rows.append(tuple(cell[c] for c in columns))
    widths = [max(len(h), *(len(row[i]) for row in rows)) if rows else len(h) for i, h in enumerate(columns)]
    fmt = " | ".join("{:>%d}" % w for w in widths)
    lines.append(fmt.format(*columns))
    lines.append("-+-".join("-" * w for w in widths))
    lines += [fmt.format(*row) for row in rows]
    if ar_runs:
        lines.append("ar-* rows: transformers' generate, one forward per token (ms/fwd = ms per token); "
                     "vs AR = tok/s / the ar row's tok/s at the same batch")
    if reference:
        lines.append(f"vs ref = tok/s / the reference sampler's tok/s at the same batch and cache ({reference['path']})")
    if results.get("agreement_check"):
        lines.append("fast vs plain, 4-layer model with peaky random weights (decisive logits):")
        for a in results["agreement_check"]:
            lines.append(f"  b{a['batch']} cache={'on' if a['cache'] else 'off'} {a['reuse']}: agreement {a['token_agreement']:.4f}, "
                         f"{a['rows_identical']}/{a['rows']} rows identical")
    modes = sorted({str(fast_path_mode(r.get("fast_path"))) for r in runs if isinstance(r.get("fast_path"), dict)})
    if modes:
        lines.append(f"fast path modes used by path=on/graphs/compile runs: {', '.join(modes)}")
    for g in results.get("graph_check", []):
        lines.append(f"graph check b{g['batch']}: graphs vs uncaptured agreement {g['graphs_vs_uncaptured']['token_agreement']}, "
                     f"compile vs graphs {g['compile_vs_graphs']['token_agreement']}")
    for e in results["errors"]:
        lines.append(f"error: {e.get('run', e)}: {e.get('error', '')}")
    return "\n".join(lines)
