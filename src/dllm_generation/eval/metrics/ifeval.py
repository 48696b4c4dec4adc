"""IFEval: strict and loose instruction following, prompt- and instruction-level.

The 25 instruction checkers come from ``if-verifiable`` (its ``ifeval``
package is Google's reference ``instructions*.py``, the same code lm-eval
ships, without lm-eval's dependency weight or its import-time
``nltk.download``). Only the reference evaluation loop lives here, because
if-verifiable's own loop departs from the reference: it drops every
instruction of an empty response (so instruction-level accuracy would skip
them) and strips ``<think>`` blocks.

Reference rules kept exactly:

* kwargs with falsy values are dropped (the HF dataset pads unused keys with
  None) before ``build_description``; checkers that want the prompt get it;
* strict: the response as is, and an all-whitespace response fails;
* loose: passes if any of the response, it without its first line, last line,
  or both, and each of those with ``*`` removed, passes;
* prompt-level: every instruction passes; instruction-level: mean over all
  instructions of all prompts (see ``aggregate``).
"""

from __future__ import annotations

import functools
from collections.abc import Iterable, Mapping

METRIC_NAMES = (
    "prompt_level_strict_acc",
    "inst_level_strict_acc",
    "prompt_level_loose_acc",
    "inst_level_loose_acc",
)
PRIMARY_METRIC = "prompt_level_strict_acc"
WEIGHT_KEY = "num_instructions"
"""Per-sample count carried so instruction-level means weight by instructions."""


def seed_language_detection() -> None:
    """langdetect samples at random unless seeded, so IFEval's language checks
    (change_case:english_*, language:response_language) could score a short or mixed response
    either way from run to run ("to to. to?" is English in about 5 of 6 draws, Italian otherwise).
    Seeded, a response always gets the same language, in this scorer and in lm-eval's."""
    try:
        import langdetect
    except ImportError:  # nothing to seed: no language check can run without it
        return
    langdetect.DetectorFactory.seed = 0


@functools.cache
def instruction_registry() -> Mapping[str, type]:
    """The checker classes by instruction id, ready to run offline."""
    from .punkt_offline import ensure_offline_punkt

    ensure_offline_punkt()
    seed_language_detection()
    from if_verifiable.ifeval.instructions_registry import INSTRUCTION_DICT

    return INSTRUCTION_DICT


def loose_variants(response: str) -> list[str]:
    """The reference's loose-mode rewrites of a response, original first."""
    lines = response.split("\n")
    without_first = "\n".join(lines[1:]).strip()
    without_last = "\n".join(lines[:-1]).strip()
    without_both = "\n".join(lines[1:-1]).strip()
    variants = [response, without_first, without_last, without_both]
    return (
        [variants[0], variants[0].replace("*", "")]
        + variants[1:]
        + [v.replace("*", "") for v in variants[1:]]
    )


def _build_checker(instruction_id: str, kwargs: Mapping | None, prompt: str):
    registry = instruction_registry()
    if instruction_id not in registry:
        raise KeyError(f"unknown IFEval instruction id {instruction_id!r}")
    checker = registry[instruction_id](instruction_id)
    checker.build_description(**{k: v for k, v in (kwargs or {}).items() if v})
    args = checker.get_instruction_args()
    if args and "prompt" in args:
        checker.build_description(prompt=prompt)
    return checker


def _follows(checker, candidates: Iterable[str]) -> bool:
    return any(text.strip() and checker.check_following(text) for text in candidates)


def check_instructions(response: str, doc: Mapping) -> tuple[list[bool], list[bool]]:
    """Per-instruction (strict, loose) results for one response to one IFEval record."""
    variants = loose_variants(response)
    strict, loose = [], []
    for index, instruction_id in enumerate(doc["instruction_id_list"]):
        checker = _build_checker(instruction_id, doc["kwargs"][index], doc["prompt"])
        strict.append(_follows(checker, [response]))
        loose.append(_follows(checker, variants))
    return strict, loose


def score(prediction: str, doc: Mapping) -> dict:
    """Score one response; per-sample instruction-level values are fractions."""
    strict, loose = check_instructions(prediction, doc)
    count = len(strict)
    metrics = {
        "prompt_level_strict_acc": float(all(strict)),
        "inst_level_strict_acc": sum(strict) / count,
        "prompt_level_loose_acc": float(all(loose)),
        "inst_level_loose_acc": sum(loose) / count,
        WEIGHT_KEY: float(count),
    }
    return {
        "extracted": {
            "instruction_id_list": list(doc["instruction_id_list"]),
            "follow_instruction_list_strict": strict,
            "follow_instruction_list_loose": loose,
        },
        "gold": ", ".join(doc["instruction_id_list"]),
        "correct": all(strict),
        "metrics": metrics,
    }


def aggregate(per_sample: list[Mapping[str, float]]) -> dict[str, float]:
    """Prompt-level: mean over prompts; instruction-level: over all instructions."""
    if not per_sample:
        return {name: float("nan") for name in METRIC_NAMES}
    total = sum(m[WEIGHT_KEY] for m in per_sample)
    out = {}
    for name in METRIC_NAMES:
        if name.startswith("inst_level"):
            # each per-sample value is followed/count, so this recovers the count exactly
            out[name] = sum(round(m[name] * m[WEIGHT_KEY]) for m in per_sample) / total
        else:
            out[name] = sum(m[name] for m in per_sample) / len(per_sample)
    return out
