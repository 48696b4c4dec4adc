"""`results.md` and accuracy-vs-throughput plots from every summary.json under an artifacts folder.

Speedup is a config's tokens/s over the k=1 runs of the same task that share its decoding
settings (block sizes, threshold, cache, max_new_tokens, prompting, rows); several such k=1
runs (one per subset in a 3×3 grid) are averaged, which also shows the timing noise.
"""

from __future__ import annotations

import glob
import logging
import os
from collections import defaultdict

from .artifacts import read_json, write_text_atomic

logger = logging.getLogger(__name__)

REUSE_KEYS = ("k", "subset", "size", "layers", "mode")


def collect_summaries(root: str) -> dict[str, list[dict]]:
    """Summaries per task, sorted by k then config name."""
    by_task: dict[str, list[dict]] = defaultdict(list)
    for path in sorted(glob.glob(os.path.join(root, "*", "*", "summary.json"))):
        try:
            summary = read_json(path)
        except (OSError, ValueError) as err:
            logger.warning("skipping unreadable %s: %s", path, err)
            continue
        summary["_path"] = path
        by_task[summary["task"]].append(summary)
    for runs in by_task.values():
        runs.sort(key=lambda s: (s["generation"]["k"], s["config"]))
    return dict(sorted(by_task.items()))


def baseline_signature(summary: dict) -> tuple:
    """Everything that must match for a k=1 run to be this run's baseline."""
    opts = summary.get("options", {})
    gen = summary["generation"]
    return (
        gen.get("block_size"), gen.get("small_block_size"), gen.get("threshold"), gen.get("use_block_cache"),
        gen.get("max_new_tokens"), gen.get("batch_size"), opts.get("chat_template"), opts.get("num_fewshot"),
        opts.get("mmlu_mode"), summary["dataset"].get("count"), opts.get("model"),
    )


def speedups(runs: list[dict]) -> list[float | None]:
    baselines: dict[tuple, list[float]] = defaultdict(list)
    for s in runs:
        tps = s["throughput"].get("tokens_per_second")
        if s["generation"]["k"] == 1 and tps:
            baselines[baseline_signature(s)].append(tps)
    out = []
    for s in runs:
        base = baselines.get(baseline_signature(s))
        tps = s["throughput"].get("tokens_per_second")
        out.append(tps / (sum(base) / len(base)) if base and tps else None)
    return out


def build_report(root: str, *, output: str | None = None, plots: bool = True) -> str:
    """Write `<root>/results.md` (and `<root>/plots/*.png`); return the markdown path."""
    by_task = collect_summaries(root)
    output = output or os.path.join(root, "results.md")
    out_dir = os.path.dirname(os.path.abspath(output))
    lines = ["# Evaluation results", ""]
    if not by_task:
        lines.append(f"No summary.json found under `{root}`.")
    devices = sorted({s["environment"].get("device_name", "?") for runs in by_task.values() for s in runs})
    if devices:
        runs = [s for task_runs in by_task.values() for s in task_runs]
        warmed = sum(1 for s in runs if s["throughput"].get("warmup", {}).get("batches"))
        lines += [
            f"Measured on: {', '.join(devices)}. Throughput counts model-call time only; {warmed} of {len(runs)} "
            "runs first ran one uncounted warm-up batch per process. Speedup is tokens/s over the mean of the "
            "matching k=1 runs.",
            "",
        ]
    for task, runs in by_task.items():
        lines += _task_table(task, runs)
        if plots:
            png = plot_task(task, runs, os.path.join(out_dir, "plots"))
            lines += [f"![{task}: accuracy vs throughput]({os.path.relpath(png, out_dir)})", ""]
    os.makedirs(out_dir, exist_ok=True)
    write_text_atomic(output, "\n".join(lines) + "\n")
    return output


def _task_table(task: str, runs: list[dict]) -> list[str]:
    metric = runs[0].get("primary_metric", "accuracy")
    lines = [
        f"## {task}",
        "",
        f"| config | k | subset | mode | n | {metric} | tok/s | speedup vs k=1 | tok/forward | layers skipped | tokens |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for s, speedup in zip(runs, speedups(runs)):
        gen, tp = s["generation"], s["throughput"]
        reuse = gen.get("layer_reuse") or {}
        subset = ("layers " + ",".join(map(str, reuse["layers"]))) if reuse.get("layers") else (
            f"{reuse['subset']} {reuse['size']}" if reuse else "-")
        lines.append(
            f"| {s['config']} | {gen['k']} | {subset} | {reuse.get('mode', '-')} | {s['counts']['samples']} "
            f"| {_fmt(s.get('accuracy'), 4)} | {_fmt(tp.get('tokens_per_second'), 1)} | "
            f"{_fmt(speedup, 2, suffix='x')} | {_fmt(tp.get('tokens_per_forward'), 2)} | "
            f"{_fmt(tp.get('layer_skip_fraction'), 3)} | {tp.get('tokens')} |"
        )
    return lines + [""]


def plot_task(task: str, runs: list[dict], folder: str) -> str:
    """One point per config: tokens/s on x, the primary metric on y, labelled by config."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    os.makedirs(folder, exist_ok=True)
    fig, ax = plt.subplots(figsize=(7, 4.5))
    ks = sorted({s["generation"]["k"] for s in runs})
    cmap = plt.get_cmap("viridis", max(len(ks), 2))
    for i, k in enumerate(ks):
        pts = [s for s in runs if s["generation"]["k"] == k]
        xs = [s["throughput"].get("tokens_per_second") or 0.0 for s in pts]
        ys = [s.get("accuracy") or 0.0 for s in pts]
        ax.scatter(xs, ys, color=cmap(i), label=f"k={k}", s=40, marker="o" if k > 1 else "s")
        for s, x, y in zip(pts, xs, ys):
            ax.annotate(s["config"], (x, y), fontsize=6, xytext=(3, 3), textcoords="offset points")
    ax.set_xlabel("tokens / s (per device, warm-up excluded)")
    ax.set_ylabel(runs[0].get("primary_metric", "accuracy"))
    ax.set_title(f"{task}: accuracy vs throughput")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    path = os.path.join(folder, f"{task}_accuracy_vs_throughput.png")
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def _fmt(value, digits: int, suffix: str = "") -> str:
    return "n/a" if value is None else f"{value:.{digits}f}{suffix}"
