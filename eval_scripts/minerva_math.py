"""Evaluate on MATH as lm-eval's minerva_math: `python eval_scripts/minerva_math.py --help` (or `dllm-eval minerva_math --help`). The logic lives in dllm_generation.eval."""

import sys

from dllm_generation.eval.cli import main

if __name__ == "__main__":
    sys.exit(main("minerva_math"))
