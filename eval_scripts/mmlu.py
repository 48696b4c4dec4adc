"""Evaluate on MMLU: `python eval_scripts/mmlu.py --help` (or `dllm-eval mmlu --help`). The logic lives in dllm_generation.eval."""

import sys

from dllm_generation.eval.cli import main

if __name__ == "__main__":
    sys.exit(main("mmlu"))
