"""Evaluate on GPQA: `python eval_scripts/gpqa.py --help` (or `dllm-eval gpqa --help`). The logic lives in dllm_generation.eval."""

import sys

from dllm_generation.eval.cli import main

if __name__ == "__main__":
    sys.exit(main("gpqa"))
