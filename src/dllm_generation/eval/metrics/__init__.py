"""Task metrics for the eval pipeline: GSM8K, MATH, IFEval, MMLU and GPQA.

The runner needs only :func:`score_sample`, :func:`aggregate`,
:data:`METRIC_NAMES` and :data:`PRIMARY_METRIC`. Heavy or optional libraries
(math-verify, if-verifiable/NLTK) are imported inside the
functions that use them, so importing this package costs nothing on a machine
that only generates.
"""

from .choices import choice_accuracy, extract_choice, gold_letter
from .scoring import METRIC_NAMES, PRIMARY_METRIC, TASKS, aggregate, score_sample

__all__ = [
    "METRIC_NAMES",
    "PRIMARY_METRIC",
    "TASKS",
    "aggregate",
    "choice_accuracy",
    "extract_choice",
    "gold_letter",
    "score_sample",
]
