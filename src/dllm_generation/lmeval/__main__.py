"""`python -m dllm_generation.lmeval ...` / `dllm-lm-eval ...`: lm-eval's command line, model registered."""

from __future__ import annotations


def main() -> None:
    from . import adapter  # noqa: F401  (registers "dllm_generation")
    from .compat import import_evaluator

    import_evaluator()
    from lm_eval.__main__ import cli_evaluate

    cli_evaluate()


if __name__ == "__main__":
    main()
