"""GSM8K exact match (lm-eval strict-match, flexible-extract, and boxed) as an evaluate metric.

Loaded from this folder by ``dllm_generation.eval.metrics.load_metric``, so no
hub access is needed; the computation is the package's ``score_sample``.
"""

import datasets
import evaluate

from dllm_generation.eval.metrics.scoring import aggregate, score_sample

_DESCRIPTION = "lm-eval GSM8K exact match after extracting the answer three ways."
_INPUTS = """
Args:
    predictions: model generations.
    references: the GSM8K ``answer`` fields (text ending in ``#### N``).
Returns:
    exact_match_strict, exact_match_flexible, exact_match_boxed: accuracies in [0, 1].
"""


class Gsm8kExactMatch(evaluate.Metric):
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
            score_sample("gsm8k", prediction, {"answer": reference})["metrics"]
            for prediction, reference in zip(predictions, references)
        ]
        return aggregate("gsm8k", per_sample)
