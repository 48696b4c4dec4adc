"""Standard errors and group scores, computed as lm-evaluation-harness 0.4.9 computes them.

- A per-sample mean's stderr is the sample standard deviation (n - 1) over sqrt(n); with fewer
  than two samples it is undefined (lm-eval prints "N/A"; here None).
- A group's score is its children's scores weighted by size, and its stderr pools the children's
  stderrs (pooled sample variance: sum((n_i - 1) * se_i^2 * n_i) / (sum n_i - k), then / sum n_i).
  MMLU's four category groups pool their subjects, and the `mmlu` total pools all subjects directly
  (lm-eval collects a nested group's leaf tasks). MATH subjects form the `minerva_math` group.
- Metrics whose aggregation is not a plain mean (IFEval's instruction-level accuracy) get no stderr,
  as lm-eval gives none.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping

# lm-eval's MMLU groups (tags of its mmlu_<subject>.yaml files): category -> subjects.
MMLU_CATEGORIES: dict[str, tuple[str, ...]] = {
    "stem": (
        "abstract_algebra", "anatomy", "astronomy", "college_biology", "college_chemistry",
        "college_computer_science", "college_mathematics", "college_physics", "computer_security",
        "conceptual_physics", "electrical_engineering", "elementary_mathematics", "high_school_biology",
        "high_school_chemistry", "high_school_computer_science", "high_school_mathematics", "high_school_physics",
        "high_school_statistics", "machine_learning",
    ),
    "other": (
        "business_ethics", "clinical_knowledge", "college_medicine", "global_facts", "human_aging", "management",
        "marketing", "medical_genetics", "miscellaneous", "nutrition", "professional_accounting",
        "professional_medicine", "virology",
    ),
    "social_sciences": (
        "econometrics", "high_school_geography", "high_school_government_and_politics",
        "high_school_macroeconomics", "high_school_microeconomics", "high_school_psychology", "human_sexuality",
        "professional_psychology", "public_relations", "security_studies", "sociology", "us_foreign_policy",
    ),
    "humanities": (
        "formal_logic", "high_school_european_history", "high_school_us_history", "high_school_world_history",
        "international_law", "jurisprudence", "logical_fallacies", "moral_disputes", "moral_scenarios",
        "philosophy", "prehistory", "professional_law", "world_religions",
    ),
}
MMLU_CATEGORY_OF = {subject: cat for cat, subjects in MMLU_CATEGORIES.items() for subject in subjects}
# Per-sample metrics whose lm-eval aggregation is not a mean over samples (no closed-form stderr there).
NO_STDERR = ("inst_level_strict_acc", "inst_level_loose_acc")


def mean_stderr(values: list[float]) -> float | None:
    n = len(values)
    if n < 2:
        return None
    mu = sum(values) / n
    return math.sqrt(sum((x - mu) ** 2 for x in values) / (n - 1)) / math.sqrt(n)


def pooled_stderr(stderrs: list[float | None], sizes: list[int]) -> float | None:
    if any(se is None for se in stderrs) or sum(sizes) <= len(sizes):
        return None
    var = sum((n - 1) * se**2 * n for n, se in zip(sizes, stderrs)) / (sum(sizes) - len(sizes))
    return math.sqrt(var / sum(sizes))


def metric_stderrs(per_sample: list[Mapping[str, float]], names: Iterable[str]) -> dict[str, float | None]:
    """`<metric>_stderr` for each per-sample mean metric."""
    return {f"{name}_stderr": (None if name in NO_STDERR else mean_stderr([float(m[name]) for m in per_sample]))
            for name in names}


def _score(values: list[float]) -> dict:
    return {"score": sum(values) / len(values), "stderr": mean_stderr(values), "n": len(values)}


def _pool(children: list[dict]) -> dict:
    sizes = [c["n"] for c in children]
    return {
        "score": sum(c["score"] * c["n"] for c in children) / sum(sizes),
        "stderr": pooled_stderr([c["stderr"] for c in children], sizes),
        "n": sum(sizes),
    }


def group_metrics(task: str, values_by_subject: Mapping[str, list[float]]) -> dict:
    """Per-subject scores and the groups above them: MMLU categories and total, or the MATH total.

    `values_by_subject` holds the per-sample primary metric (0/1) of each subject.
    """
    subjects = {s: _score(v) for s, v in sorted(values_by_subject.items()) if v}
    out = {"subjects": subjects}
    if not subjects:
        return out
    if task == "mmlu":
        categories = {}
        for cat, names in MMLU_CATEGORIES.items():
            present = [subjects[s] for s in names if s in subjects]
            if present:
                categories[cat] = _pool(present)
        unknown = sorted(set(subjects) - set(MMLU_CATEGORY_OF))
        if unknown:
            categories["unknown"] = _pool([subjects[s] for s in unknown])
        out["categories"] = categories
    out["total"] = _pool(list(subjects.values()))
    return out
