"""GSM8K exact match, the lm-evaluation-harness way.

lm-eval's ``gsm8k`` task scores one generation with two filters, then
``exact_match`` with ``ignore_case=True``, ``ignore_punctuation=False`` and
``regexes_to_ignore=[",", "\\$", "(?s).*#### ", "\\.$"]`` applied to both the
prediction and the full gold answer:

* ``strict-match``: the first ``#### N`` (the few-shot answer format);
* ``flexible-extract``: the last number-looking token in the text.

Chat prompts ask for ``\\boxed{}`` instead, so a third ``boxed`` extraction
takes the last box and the last number inside it.

Comparison is exact string equality after that normalisation, as in lm-eval:
``"1,000" == "1000"``, ``"$5" == "5"``, ``"5." == "5"``, but ``"5.00" != "5"``
and ``"-3" != "3"``. No numeric parsing is done, so scores stay comparable
with published lm-eval numbers.
"""

from __future__ import annotations

import re

from .boxed import last_boxed_content

INVALID = "[invalid]"
"""What lm-eval's regex filter yields when nothing matches."""

STRICT_PATTERN = re.compile(r"#### (\-?[0-9\.\,]+)")
FLEXIBLE_PATTERN = re.compile(r"(-?[$0-9.,]{2,})|(-?[0-9]+)")
REGEXES_TO_IGNORE = (",", r"\$", r"(?s).*#### ", r"\.$")

EXTRACTIONS = ("strict", "flexible", "boxed")
METRIC_NAMES = tuple(f"exact_match_{name}" for name in EXTRACTIONS)
PRIMARY_METRIC = "exact_match_flexible"


def normalize(text: str) -> str:
    """lm-eval's exact_match normalisation for gsm8k (ignore regexes, then lower case)."""
    for pattern in REGEXES_TO_IGNORE:
        text = re.sub(pattern, "", text)
    return text.lower()


def _regex_filter(pattern: re.Pattern[str], text: str, group_select: int) -> str:
    """lm-eval's ``regex`` filter: pick one ``findall`` hit, its first non-empty group."""
    matches = pattern.findall(text)
    if not matches:
        return INVALID
    match = matches[group_select]
    if isinstance(match, tuple):
        non_empty = [group for group in match if group]
        match = non_empty[0] if non_empty else INVALID
    return match.strip()


def extract_strict(text: str) -> str:
    """The number after the first ``#### `` (lm-eval ``strict-match``)."""
    return _regex_filter(STRICT_PATTERN, text, 0)


def extract_flexible(text: str) -> str:
    """The last number-looking token (lm-eval ``flexible-extract``)."""
    return _regex_filter(FLEXIBLE_PATTERN, text, -1)


def extract_boxed(text: str) -> str:
    """The last number inside the last ``\\boxed{}``; the box verbatim if it has none.

    The number is taken because boxes carry LaTeX around it
    (``\\boxed{\\$18}``, ``\\boxed{18 \\text{ apples}}``) that would otherwise
    defeat exact match.
    """
    content = last_boxed_content(text)
    if content is None:
        return INVALID
    number = _regex_filter(FLEXIBLE_PATTERN, content, -1)
    return content if number == INVALID else number


_EXTRACTORS = {"strict": extract_strict, "flexible": extract_flexible, "boxed": extract_boxed}


def gold_answer(answer_field: str) -> str:
    """The normalised gold: the number after ``#### `` in the GSM8K ``answer`` field."""
    return normalize(answer_field).strip()


def is_match(extracted: str, gold: str) -> bool:
    """lm-eval exact match of one extraction against the normalised gold."""
    return extracted != INVALID and normalize(extracted) == gold


def score(prediction: str, doc: dict) -> dict:
    """Score one generation; ``extracted`` maps each extraction to its raw string."""
    gold = gold_answer(doc["answer"])
    extracted = {name: extract(prediction) for name, extract in _EXTRACTORS.items()}
    metrics = {f"exact_match_{name}": float(is_match(value, gold)) for name, value in extracted.items()}
    return {
        "extracted": extracted,
        "gold": gold,
        "correct": metrics[PRIMARY_METRIC] == 1.0,
        "metrics": metrics,
    }
