"""Resumable k × subset grid of one task: `python eval_scripts/run_grid.py --task gsm8k --k 1,2,3`."""

import os
import sys

# eval_scripts/ holds a math.py: keep this folder off the import path so `import math` (inside
# torch, random, ...) finds the standard library module, not the MATH-500 script.
_HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:] = [p for p in sys.path if os.path.abspath(p or os.curdir) != _HERE]

from dllm_generation.eval.cli import grid_main  # noqa: E402

if __name__ == "__main__":
    sys.exit(grid_main())
