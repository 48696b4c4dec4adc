"""Import lm-eval 0.4.9's evaluator next to transformers 5.

lm-eval 0.4.9.x imports every built-in model backend when its evaluator loads; one of them
(`hf_vlms`) reads `transformers.AutoModelForVision2Seq`, which transformers 5 removed, so the
import fails before any model is chosen. This project requires transformers 5, and the
``dllm_generation`` model does not use those backends. So when (and only when) that import fails,
the backends are left out: `lm_eval.models` becomes an empty package whose `huggingface.HFLM` is a
class nothing is an instance of (the evaluator only asks `isinstance` of it), and a warning says
so. lm-eval >= 0.4.10 loads its backends lazily and needs none of this.
"""

from __future__ import annotations

import logging
import sys
import types

logger = logging.getLogger(__name__)


def import_evaluator():
    """`lm_eval.evaluator`, importable with transformers 5 (see the module doc)."""
    try:
        import lm_eval.models  # noqa: F401
    except AttributeError as err:
        logger.warning("lm-eval's built-in model backends cannot be imported with this transformers (%s); "
                       "leaving them out: only registered models such as dllm_generation are available", err)
        package = types.ModuleType("lm_eval.models")
        package.__path__ = []
        huggingface = types.ModuleType("lm_eval.models.huggingface")

        class HFLM:  # noqa: D401 - a placeholder type for the evaluator's isinstance check
            """lm-eval's HF backend, not importable here."""

        huggingface.HFLM = HFLM
        package.huggingface = huggingface
        sys.modules["lm_eval.models"] = package
        sys.modules["lm_eval.models.huggingface"] = huggingface
        import lm_eval

        lm_eval.models = package
    import lm_eval.evaluator

    return lm_eval.evaluator
