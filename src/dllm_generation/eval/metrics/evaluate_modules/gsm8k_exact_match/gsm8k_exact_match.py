"""GSM8K exact match (lm-eval strict-match, flexible-extract, and boxed) as an evaluate metric.

Loaded from this folder by ``dllm_generation.eval.metrics.load_metric``, so no
hub access is needed; the computation is the package's ``score_sample``.
"""

# Imported as a module: evaluate.load takes the first Metric subclass it finds in this namespace.
from dllm_generation.eval.metrics import evaluate_base


class Gsm8kExactMatch(evaluate_base.TextScoreMetric):
    TASK = "gsm8k"
    DESCRIPTION = "lm-eval GSM8K exact match after extracting the answer three ways."
    INPUTS = """
Args:
    predictions: model generations.
    references: the GSM8K ``answer`` fields (text ending in ``#### N``).
Returns:
    exact_match_strict, exact_match_flexible, exact_match_boxed: accuracies in [0, 1].
"""

    @staticmethod
    def reference_doc(reference: str) -> dict:
        return {"answer": reference}
