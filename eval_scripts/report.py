"""results.md + accuracy-vs-throughput plots: `python eval_scripts/report.py artifacts/` (or `dllm-eval report`)."""

import sys

from dllm_generation.eval.cli import report_main

if __name__ == "__main__":
    sys.exit(report_main())
