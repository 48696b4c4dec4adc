"""Load this package's metrics through ``evaluate`` without the Hugging Face hub.

``evaluate.load("exact_match")`` fetches a script from the hub, which the eval
machines cannot reach. ``evaluate.load`` also accepts a local folder holding a
script of the same name, so the metric scripts ship inside this package and are
loaded by path. ``evaluate`` (and ``datasets``) are imported only here, on use,
so the rest of the package works where they are not installed.
"""

from __future__ import annotations

from pathlib import Path

MODULES_DIR = Path(__file__).resolve().parent / "evaluate_modules"

METRIC_MODULES: dict[str, str] = {
    "gsm8k_exact_match": "gsm8k",
    "math_verify_accuracy": "math",
    "ifeval_accuracy": "ifeval",
    "choice_accuracy": "mmlu_generative / gpqa",
}
"""Shipped metric module name -> the task(s) it scores."""


def metric_path(name: str) -> Path:
    """The folder ``evaluate.load`` is given for metric ``name``."""
    if name not in METRIC_MODULES:
        raise KeyError(f"unknown metric {name!r}; shipped: {', '.join(METRIC_MODULES)}")
    return MODULES_DIR / name


def load_metric(name: str, **kwargs):
    """``evaluate.load`` of a shipped metric by local path (works offline).

    Extra keyword arguments go to ``evaluate.load`` (``experiment_id``,
    ``keep_in_memory``, ...).
    """
    import evaluate

    return evaluate.load(str(metric_path(name)), **kwargs)
