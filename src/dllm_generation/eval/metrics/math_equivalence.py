"""MATH / MATH-500 answer equivalence through math-verify.

Deciding whether ``\\frac{1}{2}`` and ``0.5`` (or ``3\\sqrt 2`` and
``\\sqrt{18}``) are the same answer needs a LaTeX parser and a CAS; math-verify
(the library lm-eval's ``minerva_math`` uses for its ``math_verify`` metric)
does both, so nothing here compares answers by hand.

The predicted answer is the last ``\\boxed{}``; failing that, Minerva's
``Final Answer: The final answer is X. I hope it is correct.``; failing that,
whatever math-verify itself finds in the whole text (what lm-eval does).

math-verify bounds parsing and comparison with ``signal.alarm``, which only
works in the main thread; elsewhere the timeout is switched off (math-verify
would raise instead), so callers in worker threads lose the hang guard.
"""

from __future__ import annotations

import re
import threading

from .boxed import last_boxed_content

METRIC_NAMES = ("math_verify",)
PRIMARY_METRIC = "math_verify"
TIMEOUT_SECONDS = 5

_MINERVA_FINAL = re.compile(
    r"Final Answer: The final answer is\s*(.*?)\.?\s*(?:I hope it is correct|$)", re.DOTALL
)


def _timeout() -> int | None:
    """math-verify's signal-based timeout is only usable in the main thread."""
    return TIMEOUT_SECONDS if threading.current_thread() is threading.main_thread() else None


def extract_answer(text: str) -> str | None:
    """The final answer as written: last ``\\boxed{}``, else Minerva's sentence, else None."""
    boxed = last_boxed_content(text)
    if boxed is not None:
        return boxed
    finals = _MINERVA_FINAL.findall(text)
    if finals:
        answer = finals[-1].strip().strip("$").strip()
        return answer or None
    return None


def gold_answer(doc: dict) -> str:
    """MATH-500 carries ``answer``; hendrycks MATH only a ``solution`` with a box."""
    if doc.get("answer") not in (None, ""):
        return str(doc["answer"]).strip()
    boxed = last_boxed_content(doc.get("solution", ""))
    if boxed is None:
        raise ValueError("MATH doc has neither an 'answer' nor a \\boxed{} in its 'solution'")
    return boxed


def _parse(latex_or_text: str, *, is_answer: bool) -> list:
    from math_verify import parse  # lazy: only scoring MATH needs math-verify

    # A bare answer is re-boxed so math-verify reads it whole as LaTeX.
    source = f"\\boxed{{{latex_or_text}}}" if is_answer else latex_or_text
    return parse(source, parsing_timeout=_timeout())


def is_equivalent(gold: str, predicted: str) -> bool:
    """math-verify equivalence of two bare answers (``gold`` first: verify is asymmetric)."""
    from math_verify import verify

    return bool(
        verify(
            _parse(gold, is_answer=True),
            _parse(predicted, is_answer=True),
            timeout_seconds=_timeout(),
        )
    )


def score(prediction: str, doc: dict) -> dict:
    """Score one generation against a MATH / MATH-500 record."""
    from math_verify import verify

    gold = gold_answer(doc)
    extracted = extract_answer(prediction)
    if extracted is not None:
        parsed = _parse(extracted, is_answer=True)
    else:
        parsed = _parse(prediction, is_answer=False)
        # math-verify returns [sympy object, matched string]; keep the string.
        extracted = str(parsed[-1]) if parsed else ""
    correct = bool(parsed) and bool(verify(_parse(gold, is_answer=True), parsed, timeout_seconds=_timeout()))
    return {
        "extracted": extracted,
        "gold": gold,
        "correct": correct,
        "metrics": {"math_verify": float(correct)},
    }
