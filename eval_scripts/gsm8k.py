"""Evaluate on GSM8K: `python eval_scripts/gsm8k.py --help` (or `dllm-eval gsm8k --help`). The logic lives in dllm_generation.eval."""

import sys

from dllm_generation.eval.cli import main

if __name__ == "__main__":
    sys.exit(main("gsm8k"))
