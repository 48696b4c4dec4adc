"""Evaluate on arith (the shipped demo model by default): `python eval_scripts/arith.py --help` (or `dllm-eval arith --help`). The logic lives in dllm_generation.eval."""

import sys

from dllm_generation.eval.cli import main

if __name__ == "__main__":
    sys.exit(main("arith"))
