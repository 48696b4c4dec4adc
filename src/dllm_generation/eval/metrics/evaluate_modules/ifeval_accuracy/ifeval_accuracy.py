"""IFEval prompt- and instruction-level, strict and loose accuracy as an evaluate metric.

Loaded from this folder by ``dllm_generation.eval.metrics.load_metric``, so no
hub access is needed; the computation is the package's ``score_sample``. An
IFEval record's ``kwargs`` differ per instruction, which an Arrow schema cannot
hold, so each reference is the record as a JSON string.
"""

import json

import datasets
import evaluate

from dllm_generation.eval.metrics.scoring import aggregate, score_sample

_DESCRIPTION = "IFEval accuracy with the reference strict and loose rules."
_INPUTS = """
Args:
    predictions: model responses.
    references: JSON strings of IFEval records (key, prompt, instruction_id_list, kwargs).
Returns:
    prompt_level_strict_acc, inst_level_strict_acc, prompt_level_loose_acc, inst_level_loose_acc.
"""


class IfevalAccuracy(evaluate.Metric):
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
            score_sample("ifeval", prediction, json.loads(reference))["metrics"]
            for prediction, reference in zip(predictions, references)
        ]
        return aggregate("ifeval", per_sample)
