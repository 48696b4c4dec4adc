"""Evaluate on MATH-500: `python eval_scripts/math500.py --help` (or `dllm-eval math --help`). The logic lives in dllm_generation.eval."""

import sys

from dllm_generation.eval.cli import main

if __name__ == "__main__":
    sys.exit(main("math"))
