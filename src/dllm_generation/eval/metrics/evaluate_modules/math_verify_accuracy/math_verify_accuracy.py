"""MATH / MATH-500 accuracy by math-verify equivalence as an evaluate metric.

Loaded from this folder by ``dllm_generation.eval.metrics.load_metric``, so no
hub access is needed; the computation is the package's ``score_sample``.
"""

import datasets
import evaluate

from dllm_generation.eval.metrics.scoring import aggregate, score_sample

_DESCRIPTION = "Answer equivalence (math-verify) of the last boxed / Minerva final answer."
_INPUTS = """
Args:
    predictions: model generations.
    references: gold answers (MATH-500 ``answer``) or full solutions holding a \\boxed{} answer.
Returns:
    math_verify: accuracy in [0, 1].
"""


def _doc(reference):
    return {"solution": reference} if "\\boxed" in reference else {"answer": reference}


class MathVerifyAccuracy(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation="",
            inputs_description=_INPUTS,
            features=datasets.Features(
                {"predictions": datasets.Value("string"), "references": datasets.Value("string")}
            ),
        )

    def _compute(self, predictions, references):
        per_sample = [
            score_sample("math", prediction, _doc(reference))["metrics"]
            for prediction, reference in zip(predictions, references)
        ]
        return aggregate("math", per_sample)
