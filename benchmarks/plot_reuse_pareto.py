"""Accuracy against layer executions for a grid of reuse settings, and whether any adaptive
setting dominates every fixed one.

    python benchmarks/plot_reuse_pareto.py artifacts/arith --output pareto.png
    python benchmarks/plot_reuse_pareto.py runs/a/*.json runs/b/*.json --output pareto.png

Reads every `<config>/summary.json` of a task folder written by `run_grid.py` (or summary files
given one by one), and plots each configuration's accuracy (with its standard error) against its
layer executions relative to the no-reuse run (k=1). Layer executions count one per layer per
forward, so a batch-1 run counts the work of each prompt exactly; in a batched run, rows that split
into separate compute and recall forwards add forwards.

An adaptive setting (unmask_drift, per_layer) dominates a fixed point when it runs fewer layer
executions at an accuracy no lower than the fixed point's minus the adaptive run's standard error.
The script prints, for the adaptive setting that comes closest, which fixed points it does not
dominate and by how much it misses.
"""

from __future__ import annotations

import argparse
import glob
import json
import math
import os

STYLES = {"none": ("s", "black", "no reuse"), "fixed": ("o", "tab:blue", "fixed k"),
          "unmask_drift": ("^", "tab:orange", "unmask_drift"), "per_layer": ("D", "tab:green", "per_layer")}


def load(sources: list[str]) -> list[dict]:
    paths = []
    for source in sources:
        paths += sorted(glob.glob(os.path.join(source, "*", "summary.json"))) if os.path.isdir(source) else [source]
    runs = []
    for path in paths:
        with open(path, encoding="utf-8") as f:
            runs.append(json.load(f))
    if not runs:
        raise SystemExit(f"no summary.json in {sources!r} (expected <task folder>/<config>/summary.json or summary files)")
    return runs


def points(runs: list[dict]) -> list[dict]:
    baseline = [r for r in runs if (r["generation"].get("layer_reuse") or None) is None]
    if not baseline:
        raise SystemExit("the runs have no run without reuse (k=1) to compare with")
    base_calls = baseline[0]["throughput"]["layer_calls"]
    out = []
    for run in runs:
        n, acc = run["counts"]["samples"], run["accuracy"]
        reuse = run["generation"].get("layer_reuse") or {}
        out.append({"config": run["config"], "policy": reuse.get("policy", "fixed") if reuse else "none",
                    "accuracy": acc, "stderr": math.sqrt(acc * (1 - acc) / max(1, n - 1)),
                    "relative_executions": run["throughput"]["layer_calls"] / base_calls,
                    "tokens_per_second": run["throughput"].get("tokens_per_second")})
    return out


def dominance(data: list[dict]) -> list[str]:
    """Plain sentences: does an adaptive setting dominate every fixed point, and by how much it misses."""
    fixed = [p for p in data if p["policy"] in ("fixed", "none")]
    adaptive = [p for p in data if p["policy"] not in ("fixed", "none")]
    if not adaptive or not fixed:
        return ["no adaptive settings to compare" if not adaptive else "no fixed settings to compare"]

    def misses(a):
        out = []
        for f in fixed:
            execs = a["relative_executions"] - f["relative_executions"]
            acc = f["accuracy"] - (a["accuracy"] + a["stderr"])
            if execs >= 0 or acc > 0:
                out.append((f, execs, acc))
        return out

    ranked = sorted(adaptive, key=lambda a: (len(misses(a)), a["relative_executions"]))
    best = ranked[0]
    failed = misses(best)
    if not failed:
        return [f"{best['config']} dominates every fixed point: {100 * best['relative_executions']:.2f} % of the "
                f"layer executions at {100 * best['accuracy']:.1f} ± {100 * best['stderr']:.1f} %"]
    lines = [f"no adaptive setting dominates every fixed point; the closest, {best['config']}, fails against "
             f"{len(failed)} of {len(fixed)}:"]
    for f, execs, acc in failed:
        why = []
        if execs >= 0:
            why.append(f"{100 * execs:+.2f} points of layer executions")
        if acc > 0:
            why.append(f"{100 * acc:.2f} points of accuracy below, beyond one stderr")
        lines.append(f"  vs {f['config']}: " + " and ".join(why))
    return lines


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("sources", nargs="+", help="task folders of run_grid.py's output, or summary.json files")
    parser.add_argument("--output", required=True, help="PNG path")
    parser.add_argument("--title", default=None)
    parser.add_argument("--x", choices=("executions", "throughput"), default="executions",
                        help="x axis: layer executions relative to no reuse, or measured tok/s (compare tok/s only "
                        "between runs of one process on one card)")
    args = parser.parse_args(argv)
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    data = points(load(args.sources))
    fig, ax = plt.subplots(figsize=(7, 4.2))
    def x_of(p):
        return 100 * p["relative_executions"] if args.x == "executions" else p["tokens_per_second"]

    for policy, (marker, color, label) in STYLES.items():
        chosen = [p for p in data if p["policy"] == policy]
        if chosen:
            ax.errorbar([x_of(p) for p in chosen], [100 * p["accuracy"] for p in chosen],
                        yerr=[100 * p["stderr"] for p in chosen], fmt=marker, color=color, label=label, capsize=3)
    ax.set_xlabel("layer executions, % of no reuse (lower is less work)" if args.x == "executions"
                  else "tokens per second (higher is faster)")
    ax.set_ylabel("exact match, % (± standard error)")
    low = min(100 * (p["accuracy"] - 3 * p["stderr"]) for p in data)
    ax.set_ylim(max(0.0, low), min(100.0, max(100 * (p["accuracy"] + 3 * p["stderr"]) for p in data)))
    ax.set_title(args.title or f"accuracy vs {'layer executions' if args.x == 'executions' else 'throughput'}")
    ax.grid(alpha=0.3)
    ax.legend(loc="lower left")
    fig.tight_layout()
    fig.savefig(args.output, dpi=120)
    for p in sorted(data, key=lambda p: p["relative_executions"]):
        print(f"{p['config']:34s} {p['policy']:13s} executions {100 * p['relative_executions']:6.2f} %  "
              f"tok/s {p['tokens_per_second'] or 0:8.1f}  accuracy {100 * p['accuracy']:.1f} ± {100 * p['stderr']:.1f} %")
    print("\n".join(dominance(data)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
