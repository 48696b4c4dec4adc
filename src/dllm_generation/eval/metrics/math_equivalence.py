"""MATH / MATH-500 scoring as lm-evaluation-harness 0.4.9's ``minerva_math*`` tasks do it.

lm-eval's ``math_verify`` metric is ``verify(gold=parse(doc["solution"]), target=parse(output))``:
math-verify reads the answer out of the gold *solution* and out of the *whole* output itself
(last ``\\boxed{}``, Minerva's "Final Answer: The final answer is ...", or the last expression it
finds), with its default parse/verify timeouts. Nothing is extracted by hand here, so an output
scores exactly as it does there (``\\fbox{7}`` and an output with two different boxes included).

A row without a ``solution`` (a user's file with only ``answer``) is scored against
``$\\boxed{answer}$``. math-verify bounds parsing with ``signal.alarm``, which only works in the
main thread; elsewhere the timeout is switched off (math-verify would raise instead).
"""

from __future__ import annotations

import threading

METRIC_NAMES = ("math_verify",)
PRIMARY_METRIC = "math_verify"
TIMEOUT_SECONDS = 5  # math-verify's default for parse and verify, as lm-eval calls them


def _timeout() -> int | None:
    """math-verify's signal-based timeout is only usable in the main thread."""
    return TIMEOUT_SECONDS if threading.current_thread() is threading.main_thread() else None


def gold_text(doc: dict) -> str:
    """What lm-eval parses for the gold: the solution; else the bare answer boxed."""
    if doc.get("solution") not in (None, ""):
        return str(doc["solution"])
    if doc.get("answer") not in (None, ""):
        return f"$\\boxed{{{doc['answer']}}}$"
    raise ValueError("MATH doc has neither a 'solution' nor an 'answer'")


def score(prediction: str, doc: dict) -> dict:
    """Score one generation against a MATH / MATH-500 record (lm-eval's math_verify)."""
    from math_verify import parse, verify  # lazy: the generation box may lack math-verify

    gold = parse(gold_text(doc), parsing_timeout=_timeout())
    target = parse(prediction, parsing_timeout=_timeout())
    correct = bool(verify(gold=gold, target=target, timeout_seconds=_timeout()))
    return {
        "extracted": str(target[-1]) if target else "",
        "gold": str(gold[-1]) if gold else "",
        "correct": correct,
        "metrics": {"math_verify": float(correct)},
    }
