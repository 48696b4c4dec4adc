"""Evaluate on MATH (lm-eval minerva_math: all 7 subjects): `python eval_scripts/gsm8k.py --help`. All logic lives in dllm_generation.eval."""

import os
import sys

# eval_scripts/ holds a math.py: keep this folder off the import path so `import math` (inside
# torch, random, ...) finds the standard library module, not the MATH-500 script.
_HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:] = [p for p in sys.path if os.path.abspath(p or os.curdir) != _HERE]

from dllm_generation.eval.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main("minerva_math"))
