"""Accuracy against decoding speed for smollm2-bd (no reuse, k=2) and its autoregressive baseline.

    python benchmarks/plot_smollm2.py docs/results/smollm2-h100 --output docs/results/smollm2-h100/accuracy-vs-speed.png

Accuracy comes from the 500-row runs (`t0.9-b32/<config>/summary.json`, `ar/arith.json`), speed from the
runs timed alone at batch 1 (`timing-b1/<config>/summary.json`, `ar/time_b1.json`): the batched grid
shared its GPU with other runs, so its tokens/s are not timings.
"""

from __future__ import annotations

import argparse
import json
import os


def read(path: str) -> dict:
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def points(root: str) -> list[tuple[str, float, float, float]]:
    """(label, tok/s at batch 1, accuracy, stderr) for each model and setting that has both numbers."""
    found = []
    for label, accuracy_cell, timing_cell in (("block diffusion, no reuse", "k1_first0.429", "arith_b1_k1_off"),
                                              ("block diffusion, k=2 first", "k2_first0.429", "arith_b1_k2_off")):
        acc = read(os.path.join(root, "t0.9-b32", accuracy_cell, "summary.json"))
        speed = read(os.path.join(root, "timing-b1", timing_cell, "summary.json"))["throughput"]["tokens_per_second"]
        found.append((label, speed, acc["accuracy"], acc["accuracy_stderr"]))
    ar = read(os.path.join(root, "ar", "arith.json"))
    found.append(("autoregressive (transformers generate)", read(os.path.join(root, "ar", "time_b1.json"))["tokens_per_second"],
                  ar["metrics"]["exact_match_strict"], ar["stderr"]["exact_match_strict"]))
    return found


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("root", help="a results folder with t0.9-b32/, timing-b1/ and ar/")
    parser.add_argument("--output", required=True, help="PNG path")
    args = parser.parse_args(argv)
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.8))
    for (label, speed, acc, err), marker in zip(points(args.root), "osD"):
        ax.errorbar(speed, 100 * acc, yerr=100 * err, fmt=marker, capsize=3, label=label)
        print(f"{label}: {speed:.1f} tok/s, {100 * acc:.1f} ± {100 * err:.1f} %")
    ax.set_xlabel("tokens/s, batch 1, timed alone")
    ax.set_ylabel("arith exact match, 500 problems (%)")
    ax.set_xscale("log")
    ax.set_title("SmolLM2-135M-Instruct: block diffusion vs autoregressive")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(args.output, dpi=120)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
