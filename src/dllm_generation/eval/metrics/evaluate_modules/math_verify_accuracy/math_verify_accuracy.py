"""MATH / MATH-500 accuracy by math-verify equivalence as an evaluate metric.

Loaded from this folder by ``dllm_generation.eval.metrics.load_metric``, so no
hub access is needed; the computation is the package's ``score_sample``.
"""

# Imported as a module: evaluate.load takes the first Metric subclass it finds in this namespace.
from dllm_generation.eval.metrics import evaluate_base


class MathVerifyAccuracy(evaluate_base.TextScoreMetric):
    TASK = "math"
    DESCRIPTION = "Answer equivalence (math-verify) of the last boxed / Minerva final answer."
    INPUTS = """
Args:
    predictions: model generations.
    references: gold answers (MATH-500 ``answer``) or full solutions holding a \\boxed{} answer.
Returns:
    math_verify: accuracy in [0, 1].
"""

    @staticmethod
    def reference_doc(reference: str) -> dict:
        return {"solution": reference} if "\\boxed" in reference else {"answer": reference}
