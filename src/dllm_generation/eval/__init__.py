"""Evaluation pipeline: data, prompts, the run loop, artifacts, grid sweeps and reports.

Nothing here imports `datasets`, `evaluate` or `accelerate` at import time; they are loaded
when a Hub dataset, a metric or a multi-process launch needs them.
"""

from .options import TASKS, EvalOptions, InvalidOptionError

__all__ = ["TASKS", "EvalOptions", "InvalidOptionError", "run_eval", "run_grid", "grid_options", "build_report"]


def __getattr__(name):
    if name == "run_eval":
        from .runner import run_eval

        return run_eval
    if name in ("run_grid", "grid_options"):
        from . import grid

        return getattr(grid, name)
    if name == "build_report":
        from .report import build_report

        return build_report
    raise AttributeError(name)
