"""One entry point per task for the eval runner: score a sample, aggregate a run.

The runner only knows task names; this table maps each to its scorer, its
metric names and the metric that decides ``correct``.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping

from . import choices, gsm8k, ifeval, math_equivalence

_SCORERS: dict[str, Callable[[str, dict], dict]] = {
    "gsm8k": gsm8k.score,
    "arith": gsm8k.score,
    "math": math_equivalence.score,
    "minerva_math": math_equivalence.score,
    "ifeval": ifeval.score,
    "mmlu_generative": choices.score,
    "gpqa": choices.score,
}

TASKS: tuple[str, ...] = tuple(_SCORERS)

METRIC_NAMES: dict[str, list[str]] = {
    "gsm8k": list(gsm8k.METRIC_NAMES),
    "arith": list(gsm8k.METRIC_NAMES),
    "math": list(math_equivalence.METRIC_NAMES),
    "minerva_math": list(math_equivalence.METRIC_NAMES),
    "ifeval": list(ifeval.METRIC_NAMES),
    "mmlu_generative": list(choices.METRIC_NAMES),
    "gpqa": list(choices.METRIC_NAMES),
}

PRIMARY_METRIC: dict[str, str] = {
    "gsm8k": gsm8k.PRIMARY_METRIC,
    "arith": "exact_match_strict",  # the demo model answers in the `#### n` format it was trained on
    "math": math_equivalence.PRIMARY_METRIC,
    "minerva_math": math_equivalence.PRIMARY_METRIC,
    "ifeval": ifeval.PRIMARY_METRIC,
    "mmlu_generative": choices.PRIMARY_METRIC,
    "gpqa": choices.PRIMARY_METRIC,
}


def _check_task(task: str) -> None:
    if task not in _SCORERS:
        raise KeyError(f"unknown task {task!r}; expected one of {', '.join(TASKS)}")


def score_sample(task: str, prediction: str, doc: dict) -> dict:
    """Score one generation.

    Returns ``{"extracted", "gold", "correct", "metrics"}``: what was read out of
    the prediction (a string, or a dict when there are several readings), the
    normalised gold, whether the task's primary metric is 1, and every metric
    as a float. ifeval's ``metrics`` also carries ``num_instructions``, the
    weight ``aggregate`` needs for instruction-level accuracy.
    """
    _check_task(task)
    out = _SCORERS[task]("" if prediction is None else prediction, doc)
    # A scorer shared by tasks (arith uses gsm8k's) marks `correct` by its own primary metric; the
    # task's decides, so `correct` agrees with the accuracy the summary reports.
    primary = out.get("metrics", {}).get(PRIMARY_METRIC[task])
    if primary is not None:
        out["correct"] = float(primary) == 1.0
    return out


def aggregate(task: str, per_sample_metrics: list[Mapping[str, float]]) -> dict[str, float]:
    """Corpus-level metrics: the mean of each metric (ifeval: the reference way).

    An empty run gives NaN for every metric.
    """
    _check_task(task)
    if task == "ifeval":
        return ifeval.aggregate(per_sample_metrics)
    names = METRIC_NAMES[task]
    if not per_sample_metrics:
        return {name: math.nan for name in names}
    return {name: sum(float(m[name]) for m in per_sample_metrics) / len(per_sample_metrics) for name in names}
