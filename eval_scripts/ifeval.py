"""Evaluate on IFEval: `python eval_scripts/ifeval.py --help` (or `dllm-eval ifeval --help`). The logic lives in dllm_generation.eval."""

import sys

from dllm_generation.eval.cli import main

if __name__ == "__main__":
    sys.exit(main("ifeval"))
