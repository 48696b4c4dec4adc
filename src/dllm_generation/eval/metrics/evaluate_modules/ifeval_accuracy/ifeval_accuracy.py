"""IFEval prompt- and instruction-level, strict and loose accuracy as an evaluate metric.

Loaded from this folder by ``dllm_generation.eval.metrics.load_metric``, so no
hub access is needed; the computation is the package's ``score_sample``. An
IFEval record's ``kwargs`` differ per instruction, which an Arrow schema cannot
hold, so each reference is the record as a JSON string.
"""

import json

# Imported as a module: evaluate.load takes the first Metric subclass it finds in this namespace.
from dllm_generation.eval.metrics import evaluate_base


class IfevalAccuracy(evaluate_base.TextScoreMetric):
    TASK = "ifeval"
    DESCRIPTION = "IFEval accuracy with the reference strict and loose rules."
    INPUTS = """
Args:
    predictions: model responses.
    references: JSON strings of IFEval records (key, prompt, instruction_id_list, kwargs).
Returns:
    prompt_level_strict_acc, inst_level_strict_acc, prompt_level_loose_acc, inst_level_loose_acc.
"""

    @staticmethod
    def reference_doc(reference: str) -> dict:
        return json.loads(reference)
