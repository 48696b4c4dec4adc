"""The shared body of the shipped `evaluate` metric scripts.

Each script under `evaluate_modules/` only names its task, its texts and how a reference string
becomes a task document; scoring is always the package's `score_sample` + `aggregate`. Importing
this module imports `evaluate` and `datasets`, so only the metric scripts import it.
"""

from __future__ import annotations

import datasets
import evaluate

from .scoring import aggregate, score_sample


class TextScoreMetric(evaluate.Metric):
    """String predictions and string references, scored per sample and averaged."""

    TASK = ""
    DESCRIPTION = ""
    INPUTS = ""

    @staticmethod
    def reference_doc(reference: str) -> dict:
        raise NotImplementedError

    def _info(self):
        return evaluate.MetricInfo(
            description=self.DESCRIPTION,
            citation="",
            inputs_description=self.INPUTS,
            features=datasets.Features({"predictions": datasets.Value("string"), "references": datasets.Value("string")}),
        )

    def _compute(self, predictions, references):
        per_sample = [
            score_sample(self.TASK, prediction, self.reference_doc(reference))["metrics"]
            for prediction, reference in zip(predictions, references)
        ]
        return aggregate(self.TASK, per_sample)
