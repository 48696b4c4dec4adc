"""Every k × subset (× size × mode) configuration of one task: `python eval_scripts/run_grid.py --help` (or `dllm-eval grid`)."""

import sys

from dllm_generation.eval.cli import grid_main

if __name__ == "__main__":
    sys.exit(grid_main())
