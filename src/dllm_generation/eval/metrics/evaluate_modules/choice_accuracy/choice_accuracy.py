"""Multiple-choice (MMLU, GPQA) accuracy of letters read out of generations, as an evaluate metric.

Loaded from this folder by ``dllm_generation.eval.metrics.load_metric``, so no
hub access is needed; the computation is the package's ``score_sample``.
"""

import datasets
import evaluate

from dllm_generation.eval.metrics.scoring import aggregate, score_sample

_DESCRIPTION = "Accuracy of the choice letter extracted from a generative answer."
_INPUTS = """
Args:
    predictions: model generations ("The answer is (B)", "\\boxed{B}", "B. ...").
    references: gold letters ("B") or 0-based choice indices as strings ("1").
Returns:
    acc: accuracy in [0, 1].
"""


class ChoiceAccuracy(evaluate.Metric):
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
            score_sample("gpqa", prediction, {"answer": reference})["metrics"]
            for prediction, reference in zip(predictions, references)
        ]
        return aggregate("gpqa", per_sample)
