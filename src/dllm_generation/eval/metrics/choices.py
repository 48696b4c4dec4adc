"""Multiple-choice scoring (MMLU, GPQA): letter match and letter extraction.

In generative mode the model writes prose, so the chosen letter has to be
read out of it. The cues are tried from most to least explicit, so that a
stray "(A)" in the reasoning does not beat "The answer is (C)":

1. the last ``\\boxed{}`` holding a letter (or exactly one choice's text);
2. the last "answer is B" / "Answer: (B)" / "answer is **B**", then the last
   "option B" / "choice (B)" (an answer statement beats a discussed option);
3. a reply that starts with the letter ("B", "(B)", "B. Paris", "**B**");
4. the last parenthesised letter "(B)" (lm-eval's GPQA flexible filter).

Nothing found yields ``INVALID``, which never matches a gold letter.
"""

from __future__ import annotations

import re
import string
from collections.abc import Sequence

from .boxed import last_boxed_content

INVALID = "[invalid]"
LETTERS = "ABCD"
METRIC_NAMES = ("acc",)
PRIMARY_METRIC = "acc"


def _letter_class(letters: str) -> str:
    return "[" + re.escape(letters) + "]"


def gold_letter(answer: int | str, letters: str = LETTERS) -> str:
    """The gold letter from a 0-based index, a digit string, or a letter ("b", "(B)")."""
    if isinstance(answer, bool):
        raise TypeError("answer must be an index or a letter, not a bool")
    if isinstance(answer, int):
        return letters[answer]
    text = str(answer).strip()
    if text.isdigit():
        return letters[int(text)]
    letter = text.strip("()").upper()
    if len(letter) != 1 or letter not in letters:
        raise ValueError(f"not a choice letter: {answer!r}")
    return letter


def _strip_latex_text(content: str) -> str:
    """``\\text{(B) Paris}`` -> ``(B) Paris``: boxes often wrap letters in text macros."""
    return re.sub(r"\\(?:text|textbf|mathrm|mathbf)\s*\{([^{}]*)\}", r"\1", content).strip()


def _letter_in_box(content: str, choices: Sequence[str] | None, letters: str) -> str | None:
    content = _strip_latex_text(content)
    letter = re.fullmatch(r"\(?(" + _letter_class(letters) + r")\)?(?:[\s.:)].*)?", content, re.DOTALL)
    if letter:
        return letter.group(1)
    if choices:
        hits = [i for i, choice in enumerate(choices) if content.lower() == str(choice).strip().lower()]
        if len(hits) == 1:
            return letters[hits[0]]
    return None


def extract_choice(text: str, choices: Sequence[str] | None = None, letters: str = LETTERS) -> str:
    """The chosen letter in a free-form answer, or ``INVALID``."""
    letter = _letter_class(letters)
    boxed = last_boxed_content(text)
    if boxed is not None:
        found = _letter_in_box(boxed, choices, letters)
        if found:
            return found
    for cue in ("answer", "option|choice"):
        stated = re.findall(
            r"(?i:" + cue + r")(?:\s+is)?\s*:?\s*(?:\*\*|\$)?\s*(?i:option\s+)?"
            r"\(?(" + letter + r")\)?(?![A-Za-z0-9])",
            text,
        )
        if stated:
            return stated[-1]
    # Not "\s" after the letter: a reply starting "A good idea..." is prose.
    leading = re.match(r"\s*(?:\*\*)?\(?(" + letter + r")(?:[).:]|\*\*|\s*$)", text)
    if leading:
        return leading.group(1)
    parenthesised = re.findall(r"\((" + letter + r")\)", text)
    if parenthesised:
        return parenthesised[-1]
    return INVALID


def choice_accuracy(predicted: Sequence[str], gold: Sequence[int | str], letters: str = LETTERS) -> float:
    """Fraction of predicted letters equal to the gold letters (index or letter)."""
    if len(predicted) != len(gold):
        raise ValueError(f"{len(predicted)} predictions for {len(gold)} references")
    if not gold:
        return float("nan")
    hits = sum(p == gold_letter(g, letters) for p, g in zip(predicted, gold))
    return hits / len(gold)


def score(prediction: str, doc: dict) -> dict:
    """Score one generative answer to an MMLU or GPQA record (letters follow ``len(choices)``)."""
    choices = doc.get("choices")
    letters = string.ascii_uppercase[: len(choices)] if choices else LETTERS
    gold = gold_letter(doc["answer"], letters)
    extracted = extract_choice(prediction, choices, letters)
    correct = extracted == gold
    return {"extracted": extracted, "gold": gold, "correct": correct, "metrics": {"acc": float(correct)}}
