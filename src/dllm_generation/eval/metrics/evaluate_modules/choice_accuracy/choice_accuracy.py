"""Multiple-choice (MMLU, GPQA) accuracy of letters read out of generations, as an evaluate metric.

Loaded from this folder by ``dllm_generation.eval.metrics.load_metric``, so no
hub access is needed; the computation is the package's ``score_sample``.
"""

# Imported as a module: evaluate.load takes the first Metric subclass it finds in this namespace.
from dllm_generation.eval.metrics import evaluate_base


class ChoiceAccuracy(evaluate_base.TextScoreMetric):
    TASK = "gpqa"
    DESCRIPTION = "Accuracy of the choice letter extracted from a generative answer."
    INPUTS = """
Args:
    predictions: model generations ("The answer is (B)", "\\boxed{B}", "B. ...").
    references: gold letters ("B") or 0-based choice indices as strings ("1").
Returns:
    acc: accuracy in [0, 1].
"""

    @staticmethod
    def reference_doc(reference: str) -> dict:
        return {"answer": reference}
