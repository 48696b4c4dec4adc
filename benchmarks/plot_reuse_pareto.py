"""Accuracy against layer executions for a grid of reuse settings (fixed k and unmask_drift).

    python benchmarks/plot_reuse_pareto.py artifacts/arith --output pareto.png

Reads every `<config>/summary.json` of one task folder written by `run_grid.py`, and plots each
configuration's accuracy (with its standard error) against its layer executions relative to the
no-reuse run (k=1) of the same folder. Layer executions count one per layer per forward, so a
batch-1 run counts the work of each prompt exactly; in a batched run, rows that split into separate
compute and recall forwards add forwards.
"""

from __future__ import annotations

import argparse
import glob
import json
import math
import os


def load(folder: str) -> list[dict]:
    runs = []
    for path in sorted(glob.glob(os.path.join(folder, "*", "summary.json"))):
        with open(path, encoding="utf-8") as f:
            runs.append(json.load(f))
    if not runs:
        raise SystemExit(f"no summary.json under {folder!r} (expected <task folder>/<config>/summary.json)")
    return runs


def points(runs: list[dict]) -> list[dict]:
    baseline = [r for r in runs if (r["generation"].get("layer_reuse") or None) is None]
    if not baseline:
        raise SystemExit("the folder has no run without reuse (k=1) to compare with")
    base_calls = baseline[0]["throughput"]["layer_calls"]
    out = []
    for run in runs:
        n, acc = run["counts"]["samples"], run["accuracy"]
        reuse = run["generation"].get("layer_reuse") or {}
        out.append({"config": run["config"], "policy": reuse.get("policy", "fixed") if reuse else "none",
                    "accuracy": acc, "stderr": math.sqrt(acc * (1 - acc) / max(1, n - 1)),
                    "relative_executions": run["throughput"]["layer_calls"] / base_calls})
    return out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("folder", help="a task folder of run_grid.py's output, e.g. artifacts/arith")
    parser.add_argument("--output", required=True, help="PNG path")
    parser.add_argument("--title", default=None)
    args = parser.parse_args(argv)
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    data = points(load(args.folder))
    fig, ax = plt.subplots(figsize=(7, 4.2))
    styles = {"none": ("s", "black", "no reuse"), "fixed": ("o", "tab:blue", "fixed k"),
              "unmask_drift": ("^", "tab:orange", "unmask_drift")}
    for policy, (marker, color, label) in styles.items():
        chosen = [p for p in data if p["policy"] == policy]
        if chosen:
            ax.errorbar([100 * p["relative_executions"] for p in chosen], [100 * p["accuracy"] for p in chosen],
                        yerr=[100 * p["stderr"] for p in chosen], fmt=marker, color=color, label=label, capsize=3)
    ax.set_xlabel("layer executions, % of no reuse (lower is less work)")
    ax.set_ylabel("exact match, % (± standard error)")
    low = min(100 * (p["accuracy"] - 3 * p["stderr"]) for p in data)
    ax.set_ylim(max(0.0, low), min(100.0, max(100 * (p["accuracy"] + 3 * p["stderr"]) for p in data)))
    ax.set_title(args.title or f"{os.path.basename(os.path.normpath(args.folder))}: accuracy vs layer executions")
    ax.grid(alpha=0.3)
    ax.legend(loc="lower left")
    fig.tight_layout()
    fig.savefig(args.output, dpi=120)
    for p in sorted(data, key=lambda p: p["relative_executions"]):
        print(f"{p['config']:34s} {p['policy']:13s} executions {100 * p['relative_executions']:6.2f} %  "
              f"accuracy {100 * p['accuracy']:.1f} ± {100 * p['stderr']:.1f} %")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
