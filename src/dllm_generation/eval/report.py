"""`results.md` and accuracy-vs-throughput plots from every summary.json under an artifacts folder.

Speedup is a config's tokens/s over the k=1 runs of the same task that share its decoding
settings (block sizes, threshold, cache, max_new_tokens, prompting, rows); several such k=1
runs (one per subset in a 3×3 grid) are averaged, which also shows the timing noise.

Each row says which decoding path actually ran (the fast path or the plain path), and a row
measured on a CPU or on a host busy with other work is flagged: its tokens/s is not comparable.
"""

from __future__ import annotations

import glob
import logging
import os
from collections import defaultdict

from ..reuse.config import is_share, size_label
from .artifacts import RunFiles, write_text_atomic
from .provenance import BUSY_LOAD_PER_CPU

logger = logging.getLogger(__name__)

REUSE_KEYS = ("k", "subset", "size", "layers", "mode")


def collect_summaries(root: str) -> dict[str, list[dict]]:
    """Summaries per task, sorted by k then config name."""
    by_task: dict[str, list[dict]] = defaultdict(list)
    for path in sorted(glob.glob(os.path.join(root, "*", "*", "summary.json"))):
        summary = RunFiles(os.path.dirname(path)).read_summary()
        if summary is None:  # unreadable (logged): listed with the incomplete runs
            continue
        summary["_path"] = path
        by_task[summary["task"]].append(summary)
    for runs in by_task.values():
        runs.sort(key=lambda s: (s["generation"]["k"], s["config"]))
    return dict(sorted(by_task.items()))


def incomplete_runs(root: str, shown: set[str]) -> list[tuple[str, str]]:
    """(folder, state) of every run folder under `root` whose summary is not among `shown` (folders):
    an interrupted run, or one whose --force replacement stopped (its earlier results wait in `.replaced/`)."""
    found = []
    for identity in sorted(glob.glob(os.path.join(root, "*", "*", "run.json"))):
        folder = os.path.dirname(identity)
        files = RunFiles(folder)
        if os.path.isdir(files.replaced_dir):
            found.append((folder, "a --force rerun stopped before its first result; rerun it to restore or replace "
                                  "the earlier results"))
        elif folder not in shown:
            done = len(files.finished_samples())
            found.append((folder, f"interrupted, {done} row(s) finished; rerun the same command to resume"))
    return found


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
        flagged = sum(1 for s in runs if comparability(s))
        lines += [
            f"Measured on: {', '.join(devices)}. Throughput counts model-call time only; {warmed} of {len(runs)} "
            "runs first ran one uncounted warm-up batch per process. Speedup is tokens/s over the mean of the "
            "matching k=1 runs. \"path\" is the decoding path that ran (fast path mode, or the plain path and why).",
            "",
        ]
        if flagged:
            lines += [
                f"**{flagged} of {len(runs)} runs have throughput that is not comparable** (see \"note\"): measured on "
                f"a CPU, or on a host whose load average before the run exceeded {BUSY_LOAD_PER_CPU} per CPU. "
                "Their accuracy stands; compare their tokens/s only with runs of the same note.",
                "",
            ]
    for task, runs in by_task.items():
        lines += _task_table(task, runs)
        if plots:
            png = plot_task(task, runs, os.path.join(out_dir, "plots"))
            lines += [f"![{task}: accuracy vs throughput]({os.path.relpath(png, out_dir)})", ""]
    unfinished = incomplete_runs(root, {os.path.dirname(s["_path"]) for runs in by_task.values() for s in runs})
    if unfinished:
        lines += ["## Incomplete runs (not in the tables)", ""]
        lines += [f"- `{os.path.relpath(folder, root)}`: {state}" for folder, state in unfinished] + [""]
    os.makedirs(out_dir, exist_ok=True)
    write_text_atomic(output, "\n".join(lines) + "\n")
    return output


def grid_table(cells) -> str:
    """The accuracy x speed table of a grid's cells that have a summary (what `run_grid` prints)."""
    files = [RunFiles(options.run_dir()) for options in cells]
    runs = [s for s in (f.read_summary() for f in files) if s is not None]
    if not runs:
        return "no finished configurations yet"
    return "\n".join(_task_table(runs[0]["task"], runs))


def comparability(summary: dict) -> str:
    """Why a run's tokens/s is not comparable ("" when it is): a CPU device, or a busy host."""
    env = summary.get("environment", {})
    notes = []
    if str(env.get("device", "")).startswith("cpu"):
        notes.append("CPU")
    if env.get("busy"):
        if env.get("other_cpu_use_before") is not None:
            notes.append(f"busy host (other processes used {env['other_cpu_use_before']} of "
                         f"{env.get('cpu_count', '?')} CPUs)")
        else:
            load = (env.get("load_average_before") or ["?"])[0]
            notes.append(f"busy host (load {load} on {env.get('cpu_count', '?')} CPUs)")
    return ", ".join(notes) + ": tok/s not comparable" if notes else ""


def _subset_text(reuse: dict) -> str:
    """The reused layers as a reader wants them: `first 0.429 (6 layers)`, not the share's full float."""
    if not reuse:
        return "-"
    if reuse.get("layers"):
        return "layers " + ",".join(map(str, reuse["layers"]))
    text = f"{reuse['subset']} {size_label(reuse['size'])}"
    resolved = reuse.get("resolved_layers")
    return text + (f" ({len(resolved)} layers)" if resolved and is_share(reuse["size"]) else "")


def _task_table(task: str, runs: list[dict]) -> list[str]:
    metric = runs[0].get("primary_metric", "accuracy")
    lines = [
        f"## {task}",
        "",
        f"| config | k | subset | mode | n | {metric} | tok/s | speedup vs k=1 | tok/forward | layers skipped | tokens "
        "| path | note |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for s, speedup in zip(runs, speedups(runs)):
        gen, tp = s["generation"], s["throughput"]
        reuse = gen.get("layer_reuse") or {}
        subset = _subset_text(reuse)
        lines.append(
            f"| {s['config']} | {gen['k']} | {subset} | {reuse.get('mode', '-')} | {s['counts']['samples']} "
            f"| {_fmt(s.get('accuracy'), 4)} | {_fmt(tp.get('tokens_per_second'), 1)} | "
            f"{_fmt(speedup, 2, suffix='x')} | {_fmt(tp.get('tokens_per_forward'), 2)} | "
            f"{_fmt(tp.get('layer_skip_fraction'), 3)} | {tp.get('tokens')} | {gen.get('fast_path') or '-'} "
            f"| {comparability(s)} |"
        )
    return lines + [""]


LABEL_HEIGHT_IN = 0.17  # vertical room per point label (7 pt text plus spacing)


def plot_task(task: str, runs: list[dict], folder: str) -> str:
    """One point per config: tokens/s on x, the primary metric on y, labelled by config."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    os.makedirs(folder, exist_ok=True)
    fig = draw_task(task, runs)
    path = os.path.join(folder, f"{task}_accuracy_vs_throughput.png")
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def draw_task(task: str, runs: list[dict]):
    """The figure of `plot_task`. Labels sit in a column right of the axes, at least one label
    height apart, each with a line to its point, so clustered points never overlap their labels;
    the metric axis stays within 0-100 %."""
    import matplotlib.pyplot as plt
    from matplotlib.ticker import PercentFormatter

    height = max(4.5, LABEL_HEIGHT_IN * len(runs) / 0.8 + 1.0)
    fig, ax = plt.subplots(figsize=(9, height))
    fig.subplots_adjust(left=0.1, right=0.62, top=0.9, bottom=0.1)
    xs = [s["throughput"].get("tokens_per_second") or 0.0 for s in runs]
    ys = [min(max(s.get("accuracy") or 0.0, 0.0), 1.0) for s in runs]
    ks = sorted({s["generation"]["k"] for s in runs})
    cmap = plt.get_cmap("viridis", max(len(ks), 2))
    for i, k in enumerate(ks):
        idx = [j for j, s in enumerate(runs) if s["generation"]["k"] == k]
        ax.scatter([xs[j] for j in idx], [ys[j] for j in idx], color=cmap(i), label=f"k={k}", s=40,
                   marker="o" if k > 1 else "s", zorder=3)
    pad = 0.05
    ax.set_ylim(max(0.0, min(ys) - pad), min(1.0, max(ys) + pad))
    ax.set_xlim(0.0, max(max(xs) * 1.1, 1e-9))
    ax.yaxis.set_major_formatter(PercentFormatter(xmax=1.0))
    fig.canvas.draw()
    # Label rows in axes-fraction units, ordered like the points, pushed apart to one label height.
    gap = LABEL_HEIGHT_IN / (height * 0.8)
    to_frac = ax.transAxes.inverted().transform
    fracs = [to_frac(ax.transData.transform((x, y)))[1] for x, y in zip(xs, ys)]
    for i, y in zip(range(len(runs)), _spread(fracs, gap)):
        ax.annotate(runs[i]["config"], xy=(xs[i], ys[i]), xycoords="data", xytext=(1.03, y),
                    textcoords="axes fraction", fontsize=7, va="center",
                    arrowprops={"arrowstyle": "-", "color": "0.6", "lw": 0.6})
    ax.set_xlabel("tokens / s (per device, warm-up excluded)")
    ax.set_ylabel(runs[0].get("primary_metric", "accuracy"))
    ax.set_title(f"{task}: accuracy vs throughput")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="lower left")
    return fig


def _spread(positions: list[float], gap: float) -> list[float]:
    """Positions in [0, 1] at least `gap` apart, each as close to its wish as the others allow."""
    order = sorted(range(len(positions)), key=lambda i: positions[i])
    out = [0.0] * len(positions)
    floor = -float("inf")
    for i in order:  # upwards: no label closer than `gap` to the one below
        out[i] = max(positions[i], floor + gap, 0.0)
        floor = out[i]
    ceiling = float("inf")
    for i in reversed(order):  # downwards: keep inside the top, still `gap` apart
        out[i] = min(out[i], ceiling - gap, 1.0)
        ceiling = out[i]
    return out


def _fmt(value, digits: int, suffix: str = "") -> str:
    return "n/a" if value is None else f"{value:.{digits}f}{suffix}"
