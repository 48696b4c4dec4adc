"""Benchmark rows for each task, from the Hugging Face Hub or from local files, in one shape.

Hub ids go through `datasets.load_dataset` (imported only then, so evaluating local files does
not need it). Local JSON Lines / JSON / CSV files are read with the standard library, so an
offline machine without `datasets` can still evaluate. Every row becomes an `Example(id, doc)`;
the `doc` keeps the source fields and, for multiple-choice tasks, adds `choices` / `answer`
(index) / `answer_letter` so prompts and metrics read one schema whatever the source.

Every row is checked for the fields its task reads before anything is decoded, so a wrong file
(another task's data, a missing column, a malformed line) stops the run at once with the file,
the line or row, and what was expected.
"""

from __future__ import annotations

import csv
import glob
import json
import logging
import os
import random
import re
from dataclasses import dataclass, field

from ..arith.data import test_set_path as arith_test_set_path
from .metrics.choices import LETTERS

logger = logging.getLogger(__name__)

# EleutherAI/hendrycks_math configs in lm-eval's minerva_math group order (its subtasks
# minerva_math_algebra, _counting_and_prob, _geometry, _intermediate_algebra, _num_theory, _prealgebra, _precalc).
MINERVA_MATH_SUBJECTS = ("algebra", "counting_and_probability", "geometry", "intermediate_algebra",
                         "number_theory", "prealgebra", "precalculus")
# lm-eval's gpqa n_shot utils shuffle every document's options with one module-level Random(42).
GPQA_SHUFFLE_SEED = 42
MMLU_COLUMNS = ("question", "A", "B", "C", "D", "answer_letter")
GPQA_WRONG = ("Incorrect Answer 1", "Incorrect Answer 2", "Incorrect Answer 3")
LOCAL_SUFFIXES = (".jsonl", ".json", ".csv", ".parquet")


@dataclass(frozen=True)
class HubSource:
    path: str
    config: str | None
    split: str
    fewshot_split: str | None = None


HUB_SOURCES = {
    "gsm8k": HubSource("openai/gsm8k", "main", "test", fewshot_split="train"),
    "math": HubSource("HuggingFaceH4/MATH-500", None, "test"),
    "minerva_math": HubSource("EleutherAI/hendrycks_math", None, "test"),
    "ifeval": HubSource("google/IFEval", None, "train"),
    "mmlu": HubSource("cais/mmlu", "all", "test", fewshot_split="dev"),
    "gpqa": HubSource("Idavidrein/gpqa", "gpqa_main", "train"),
}

# Fields each task reads from a row (prompts and metrics); checked before anything is decoded.
# A tuple inside the tuple means "at least one of these".
REQUIRED_FIELDS: dict[str, tuple] = {
    "gsm8k": ("question", "answer"),
    "arith": ("question", "answer"),
    "math": ("problem", ("answer", "solution")),
    "minerva_math": ("problem", "solution"),
    "ifeval": ("prompt", "instruction_id_list", "kwargs"),
    "mmlu": ("question", "choices", "answer"),
    "gpqa": ("Question", "Correct Answer", *GPQA_WRONG),
}
SPLIT_NAMES = ("test", "train", "validation", "dev", "val")

# What to pass with --data-files when the Hub cannot be reached (paths as in shared/data).
LOCAL_HINTS = {
    "gsm8k": "--data-files <data>/gsm8k/test.jsonl (few-shot examples come from train.jsonl beside it)",
    "math": "--data-files <data>/math500/test.jsonl",
    "minerva_math": "--data-files with the MATH test rows (problem, solution, and type or subject), e.g. the "
    "EleutherAI/hendrycks_math test files of all 7 subjects",
    "ifeval": "--data-files <data>/ifeval/input_data.jsonl",
    "mmlu": "--data-files <data>/mmlu (a folder with test/ and dev/ CSVs, headerless: question,A,B,C,D,answer)",
    "arith": "--data-files <jsonl with question/answer rows> (default: the shipped held-out test set)",
    "gpqa": "--data-files gpqa_main.csv (or gpqa_diamond.csv) from the GPQA release; GPQA is gated on the Hub: "
    "set HF_TOKEN to use Idavidrein/gpqa",
}


class DataUnavailableError(RuntimeError):
    """The benchmark rows could not be read; the message says what was tried and what to pass instead."""


@dataclass
class Example:
    id: str
    doc: dict


@dataclass
class TaskData:
    """The rows to evaluate (already limited), the few-shot pool, and where they came from."""

    examples: list[Example]
    fewshot: dict = field(default_factory=dict)  # task-specific: {"": [...]} or {subject: [...]}
    source: dict = field(default_factory=dict)


# ---------------------------------------------------------------------------- entry point
def load_task_data(options) -> TaskData:
    """Read the evaluation rows (and few-shot rows when the prompt needs them) for `options.task`.

    Every row is checked for the fields the task reads; an empty source is refused.
    """
    task = options.task
    need_fewshot = options.fewshot > 0
    hub = HUB_SOURCES.get(task, HubSource(options.dataset, None, "test"))
    hub = HubSource(
        options.dataset or hub.path,
        options.dataset_config if options.dataset_config is not None else hub.config,
        options.split or hub.split,
        hub.fewshot_split,
    )
    if options.data_files:
        rows, fewshot_rows, source = _read_local(task, options.data_files, options.fewshot_files, need_fewshot,
                                                 split=hub.split)
    elif task == "arith" and not options.dataset:
        rows, fewshot_rows, source = _read_local(task, [arith_test_set_path()], None, False, split="test")
    else:
        rows, fewshot_rows, source = _read_hub(task, hub, need_fewshot)
    if not rows:
        raise DataUnavailableError(f"{task} data from {_where(source)} has no rows; expected {LOCAL_HINTS[task]}")
    examples = _to_examples(task, rows, seed=options.seed)
    total = len(examples)
    if options.limit is not None:
        examples = examples[: options.limit]
    fewshot = _fewshot_pool(task, fewshot_rows, options.fewshot, seed=options.seed) if need_fewshot else {}
    source.update(total=total, count=len(examples), limit=options.limit, num_fewshot=options.fewshot)
    return TaskData(examples=examples, fewshot=fewshot, source=source)


def check_fields(task: str, rows: list[dict], where: str, *, first_line: int | None = None) -> None:
    """Refuse rows that lack a field the task reads (e.g. another task's file), naming the first one.

    `first_line`: the file line of rows[0] when rows are lines of a JSON Lines file (1-based),
    so the message can point at it; otherwise rows are counted from 0.
    """
    required = REQUIRED_FIELDS[task]
    for i, row in enumerate(rows):
        place = f"line {first_line + i}" if first_line is not None else f"row {i}"
        if not isinstance(row, dict):
            raise DataUnavailableError(f"{where}: {place} is a {type(row).__name__}, not an object with fields")
        for need in required:
            options = need if isinstance(need, tuple) else (need,)
            if not any(name in row for name in options):
                wanted = " or ".join(repr(n) for n in options)
                have = ", ".join(sorted(map(str, row))[:8]) or "none"
                raise DataUnavailableError(
                    f"{where}: {place} has no field {wanted} (fields: {have}); {task} rows need "
                    f"{', '.join(_field_names(required))}. Is this {task} data? Expected {LOCAL_HINTS[task]}"
                )
            if all(row.get(name) is None for name in options):  # present, but null: nothing to prompt with
                raise DataUnavailableError(
                    f"{where}: {place} has field {options[0]!r} = null (allowed: a value, e.g. text); "
                    "fix or remove that row"
                )


def _field_names(required: tuple) -> list[str]:
    return [" or ".join(n) if isinstance(n, tuple) else n for n in required]


def _where(source: dict) -> str:
    if source.get("kind") == "hub":
        return f"Hub dataset {source['path']!r} (config={source['config']!r}, split={source['split']!r})"
    return ", ".join(repr(p) for p in source.get("files", []))


# ---------------------------------------------------------------------------- hub
def _read_hub(task: str, hub: HubSource, need_fewshot: bool):
    if task == "minerva_math" and hub.config is None:
        # lm-eval's minerva_math group: one subtask per subject config, in this order.
        rows = [dict(r, type=r.get("type") or config)
                for config in MINERVA_MATH_SUBJECTS for r in _load_hub_split(task, hub.path, config, hub.split)]
        return rows, None, {"kind": "hub", "path": hub.path, "config": list(MINERVA_MATH_SUBJECTS), "split": hub.split}
    rows = _load_hub_split(task, hub.path, hub.config, hub.split)
    fewshot_rows = None
    if need_fewshot:
        if hub.fewshot_split is None:
            raise DataUnavailableError(f"task {task!r} has no few-shot split on the Hub; use --num-fewshot 0")
        fewshot_rows = _load_hub_split(task, hub.path, hub.config, hub.fewshot_split)
    source = {"kind": "hub", "path": hub.path, "config": hub.config, "split": hub.split}
    if need_fewshot:
        source["fewshot_split"] = hub.fewshot_split
    return rows, fewshot_rows, source


def _load_hub_split(task: str, path: str, config: str | None, split: str) -> list[dict]:
    tried = f"Hub dataset {path!r} (config={config!r}, split={split!r})"
    try:
        import datasets
    except ImportError as err:
        raise DataUnavailableError(
            f"cannot load {task} data: {tried} needs the `datasets` package, which is not installed ({err}). "
            f"Install it (pip install datasets) or pass local files: {LOCAL_HINTS[task]}"
        ) from None
    try:
        ds = datasets.load_dataset(path, name=config, split=split)
    except Exception as err:  # offline, gated, unknown id, bad split: all mean "pass files instead"
        raise DataUnavailableError(
            f"cannot load {task} data from {tried}: {type(err).__name__}: {one_line(err)}. "
            f"If this machine is offline or the dataset is gated, pass local files: {LOCAL_HINTS[task]}"
        ) from err
    rows = ds.to_list()
    check_fields(task, rows, tried)
    return rows


def one_line(err: Exception) -> str:
    """An exception's message on one line (error output is one line per failure)."""
    return " ".join(str(err).split()).rstrip(".")


# ---------------------------------------------------------------------------- local files
def _read_local(task: str, data_files: list[str], fewshot_files: list[str] | None, need_fewshot: bool, *,
                split: str):
    if task == "mmlu":
        return _read_local_mmlu(data_files, fewshot_files, need_fewshot, split=split)
    files = _expand(data_files, task, split=split)
    rows = [row for path in files for row in _read_file(path, task)]
    fewshot_rows = None
    if need_fewshot:
        fs_files = _expand(fewshot_files, task, split="train") if fewshot_files else _sibling_train(files)
        if not fs_files:
            raise DataUnavailableError(
                f"{task} few-shot prompts need training rows: none found beside {files[0]!r}; "
                "pass --fewshot-files <train.jsonl> or --num-fewshot 0"
            )
        fewshot_rows = [row for path in fs_files for row in _read_file(path, task)]
    source = {"kind": "files", "files": [os.path.abspath(p) for p in files], "split": _split_from_name(files[0])}
    if need_fewshot:
        source["fewshot_files"] = [os.path.abspath(p) for p in fs_files]
    return rows, fewshot_rows, source


def _expand(paths: list[str], task: str, *, split: str) -> list[str]:
    """Files named directly, plus the data files of `split` inside named folders.

    A folder contributes the files whose name says they are `split` (`test.jsonl`,
    `gsm8k_test.csv`, ...), or its only data file. A folder holding several files, none of them
    named for `split`, is ambiguous and refused: silently mixing a training split into the
    evaluation rows is exactly what this guards against.
    """
    out: list[str] = []
    for path in paths:
        if os.path.isdir(path):
            found = sorted(p for p in glob.glob(os.path.join(path, "*")) if p.endswith(LOCAL_SUFFIXES))
            if not found:
                raise DataUnavailableError(
                    f"no {', '.join(LOCAL_SUFFIXES)} files in folder {path!r}; expected {LOCAL_HINTS[task]}"
                )
            out.extend(_files_of_split(found, split, path))
        elif os.path.isfile(path):
            out.append(path)
        else:
            raise DataUnavailableError(f"data file {path!r} does not exist; expected {LOCAL_HINTS[task]}")
    return out


def _files_of_split(found: list[str], split: str, folder: str) -> list[str]:
    if len(found) == 1:
        return found
    mine = [p for p in found if _split_from_name(p) == split]
    if mine:
        return mine
    names = ", ".join(os.path.basename(p) for p in found)
    raise DataUnavailableError(
        f"folder {folder!r} holds several data files ({names}) and none is named for the {split!r} split; "
        f"name the file itself with --data-files, or pick the split with --split"
    )


def _sibling_train(files: list[str]) -> list[str]:
    candidate = os.path.join(os.path.dirname(os.path.abspath(files[0])), "train.jsonl")
    return [candidate] if os.path.isfile(candidate) and os.path.abspath(files[0]) != candidate else []


def _split_from_name(path: str) -> str:
    stem = os.path.splitext(os.path.basename(path))[0]
    for split in SPLIT_NAMES:
        if stem == split or stem.endswith("_" + split):
            return split
    return stem


def _read_file(path: str, task: str, *, columns: tuple[str, ...] | None = None) -> list[dict]:
    """Rows of one JSON Lines / JSON / CSV / Parquet file as dicts, each checked for the task's fields
    (MMLU's headerless CSVs, read with `columns`, are checked by `_mmlu_rows`)."""
    where = f"{task} data file {path!r}"
    try:
        if path.endswith(".jsonl"):
            with open(path, encoding="utf-8") as f:
                rows, lines = _json_lines(f, where)
            _check_lines(task, rows, lines, where)
            return rows
        if path.endswith(".json"):
            with open(path, encoding="utf-8") as f:
                text = f.read()
            try:
                data = json.loads(text)
            except json.JSONDecodeError as err:
                if not err.msg.startswith("Extra data"):
                    raise DataUnavailableError(
                        f"{where}: line {err.lineno} is not valid JSON ({err.msg} at column {err.colno})"
                    ) from None
                rows, lines = _json_lines(text.splitlines(), where)  # JSON Lines saved as .json
                _check_lines(task, rows, lines, where)
                return rows
            if isinstance(data, dict):
                data = data.get("data") or data.get("rows") or next(iter(data.values()))
            rows = list(data)
            check_fields(task, rows, where)
            return rows
        if path.endswith(".csv"):
            # newline="" lets the csv module handle CRLF and quoted fields spanning lines.
            with open(path, encoding="utf-8", newline="") as f:
                if columns is None:
                    rows = [dict(row) for row in csv.DictReader(f)]
                    check_fields(task, rows, where)
                    return rows
                return [dict(zip(columns, row)) for row in csv.reader(f) if row]
        if path.endswith(".parquet"):
            import pandas

            rows = pandas.read_parquet(path).to_dict(orient="records")
            check_fields(task, rows, where)
            return rows
    except (OSError, UnicodeDecodeError, csv.Error) as err:
        raise DataUnavailableError(f"cannot read {where}: {one_line(err)}") from err
    raise DataUnavailableError(f"unsupported data file {path!r} (allowed: {', '.join(LOCAL_SUFFIXES)})")


def _json_lines(lines, where: str) -> tuple[list, list[int]]:
    """Parsed non-blank lines and their 1-based line numbers; a malformed line is named by its number."""
    rows, numbers = [], []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError as err:
            raise DataUnavailableError(f"{where}: line {number} is not valid JSON ({err.msg} at column {err.colno})") from None
        numbers.append(number)
    return rows, numbers


def _check_lines(task: str, rows: list, numbers: list[int], where: str) -> None:
    for row, number in zip(rows, numbers):
        check_fields(task, [row], where, first_line=number)


def _read_local_mmlu(data_files, fewshot_files, need_fewshot, *, split: str):
    """MMLU release layout: one headerless CSV per subject, `<subject>_test.csv` / `<subject>_dev.csv`."""
    test_files, dev_files = [], []
    for path in data_files:
        if os.path.isdir(path) and os.path.isdir(os.path.join(path, split)):
            test_files += _csvs(os.path.join(path, split), split)
            if os.path.isdir(os.path.join(path, "dev")):
                dev_files += _csvs(os.path.join(path, "dev"), "dev")
        elif os.path.isdir(path):
            test_files += _csvs(path, split)
            sibling = os.path.join(os.path.dirname(os.path.abspath(path)), "dev")
            if os.path.isdir(sibling) and os.path.abspath(path) != sibling:
                dev_files += _csvs(sibling, "dev")
        else:
            test_files += _expand([path], "mmlu", split=split)
    if fewshot_files:
        dev_files = [p for f in fewshot_files for p in (_csvs(f, "dev") if os.path.isdir(f) else [f])]
    if not test_files:
        raise DataUnavailableError(f"no MMLU CSV files found in {data_files!r}; expected {LOCAL_HINTS['mmlu']}")
    if need_fewshot and not dev_files:
        raise DataUnavailableError(
            f"MMLU few-shot prompts need the dev split: no dev/ CSVs found for {data_files!r}; "
            "pass --fewshot-files <mmlu>/dev or --num-fewshot 0"
        )
    rows = _mmlu_rows(test_files)
    source = {"kind": "files", "files": [os.path.abspath(p) for p in test_files], "split": split}
    fewshot_rows = None
    if need_fewshot:
        fewshot_rows = _mmlu_rows(dev_files)
        source["fewshot_files"] = [os.path.abspath(p) for p in dev_files]
        source["fewshot_split"] = "dev"
    return rows, fewshot_rows, source


def _csvs(folder: str, split: str) -> list[str]:
    """The CSVs of `split` in an MMLU folder (`<subject>_<split>.csv`); files named for another
    split are left out, so a folder holding test and dev files mixes nothing."""
    found = sorted(glob.glob(os.path.join(folder, "*.csv")))
    if not found:
        raise DataUnavailableError(f"no CSV files in MMLU folder {folder!r}; expected {LOCAL_HINTS['mmlu']}")
    named = {p: _split_from_name(p) for p in found}
    other = [p for p, s in named.items() if s in SPLIT_NAMES and s != split]
    return [p for p in found if p not in other]


def _mmlu_rows(files: list[str]) -> list[dict]:
    rows = []
    for path in files:
        stem = os.path.splitext(os.path.basename(path))[0]
        subject = stem.rsplit("_", 1)[0] if stem.rsplit("_", 1)[-1] in SPLIT_NAMES else stem
        for row in _read_file(path, "mmlu", columns=MMLU_COLUMNS):
            if len(row) != len(MMLU_COLUMNS):
                raise DataUnavailableError(f"MMLU file {path!r} has a row without {len(MMLU_COLUMNS)} columns: {row!r}")
            letter = row["answer_letter"].strip()
            if letter not in LETTERS:
                raise DataUnavailableError(f"MMLU file {path!r}: answer {letter!r} is not one of A-D")
            rows.append(
                {
                    "question": row["question"],
                    "subject": subject,
                    "choices": [row[c] for c in LETTERS],
                    "answer": LETTERS.index(letter),
                }
            )
    return rows


# ---------------------------------------------------------------------------- one schema
def _to_examples(task: str, rows: list[dict], *, seed: int) -> list[Example]:
    if task == "gsm8k":
        return [Example(f"gsm8k-{i}", dict(r)) for i, r in enumerate(rows)]
    if task == "arith":
        return [Example(str(r.get("id") or f"arith-{i}"), dict(r)) for i, r in enumerate(rows)]
    if task == "math":
        return [Example(str(r.get("unique_id") or f"math-{i}"), dict(r)) for i, r in enumerate(rows)]
    if task == "minerva_math":
        return _minerva_examples(rows)
    if task == "ifeval":
        return [Example(str(r.get("key", i)), dict(r)) for i, r in enumerate(rows)]
    if task == "mmlu":
        out, per_subject = [], {}
        for r in rows:
            doc = _mmlu_doc(r)
            n = per_subject.get(doc["subject"], 0)
            per_subject[doc["subject"]] = n + 1
            out.append(Example(f"{doc['subject']}/{n}", doc))
        return out
    if task == "gpqa":
        rng = random.Random(GPQA_SHUFFLE_SEED)
        return [_gpqa_example(r, i, rng) for i, r in enumerate(rows)]
    raise ValueError(task)


def math_subject(doc: dict) -> str:
    """The MATH subject of a row: hendrycks `type` ("Counting & Probability") or MATH-500 `subject`."""
    name = str(doc.get("type") or doc.get("subject") or "unknown")
    return name.strip().lower().replace(" & ", "_and_").replace(" ", "_")


def _minerva_examples(rows: list[dict]) -> list[Example]:
    """Rows in lm-eval's subtask order (subject by subject, file order within), ids `<subject>/<i>`."""
    order = {name: i for i, name in enumerate(MINERVA_MATH_SUBJECTS)}
    for i, r in enumerate(rows):
        if "problem" not in r or "solution" not in r:
            raise DataUnavailableError(f"minerva_math row {i} lacks 'problem' or 'solution' (got {sorted(r)})")
    keyed = sorted(enumerate(rows), key=lambda ir: (order.get(math_subject(ir[1]), len(order)), ir[0]))
    out, seen = [], {}
    for _, r in keyed:
        subject = math_subject(r)
        n = seen.get(subject, 0)
        seen[subject] = n + 1
        out.append(Example(f"{subject}/{n}", dict(r, subject_key=subject)))
    return out


def _mmlu_doc(row: dict) -> dict:
    """cais/mmlu schema (question, subject, choices, answer index) plus answer_letter."""
    answer = row["answer"]
    if isinstance(answer, str):
        answer = LETTERS.index(answer.strip()) if answer.strip() in LETTERS else int(answer)
    doc = {
        "question": row["question"],
        "subject": row.get("subject") or "unknown",
        "choices": list(row["choices"]),
        "answer": int(answer),
    }
    doc["answer_letter"] = LETTERS[doc["answer"]]
    return doc


def gpqa_clean(text) -> str:
    """lm-eval's GPQA option clean-up: strip, " [title]" to ". ", drop [bracketed] spans, squeeze double spaces."""
    if text is None:
        return " "
    text = str(text).strip().replace(" [title]", ". ")
    text = re.sub(r"\[.*?\]", "", text)
    return text.replace("  ", " ")


def _gpqa_example(row: dict, index: int, rng: random.Random) -> Example:
    """GPQA release columns; options cleaned and shuffled as lm-eval's gpqa_*_n_shot does (one Random(42)
    drawn once per row in file order: the order depends on the rows before, as in lm-eval)."""
    missing = [c for c in ("Question", "Correct Answer", *GPQA_WRONG) if c not in row]
    if missing:
        raise DataUnavailableError(
            f"GPQA row {index} lacks columns {missing}; expected the GPQA release CSV "
            "(Question, Correct Answer, Incorrect Answer 1..3)"
        )
    ident = str(row.get("Record ID") or f"gpqa-{index}")
    options = [gpqa_clean(row[c]) for c in GPQA_WRONG] + [gpqa_clean(row["Correct Answer"])]
    rng.shuffle(options)
    doc = dict(row)
    doc["question"] = str(row["Question"])
    doc["choices"] = options
    doc["answer"] = options.index(gpqa_clean(row["Correct Answer"]))
    doc["answer_letter"] = LETTERS[doc["answer"]]
    return Example(ident, doc)


def _fewshot_pool(task: str, rows: list[dict] | None, n: int, *, seed: int) -> dict:
    """Worked examples for the prompt: the first `n` training rows (GSM8K) or dev rows per subject (MMLU)."""
    if task == "gsm8k":
        if len(rows) < n:
            raise DataUnavailableError(f"gsm8k: asked for {n} few-shot examples, the training rows have {len(rows)}")
        return {"": [dict(r) for r in rows[:n]]}
    if task == "mmlu":
        pool: dict[str, list] = {}
        for r in rows:
            doc = _mmlu_doc(r)
            pool.setdefault(doc["subject"], []).append(doc)
        return {subject: docs[:n] for subject, docs in pool.items()}
    return {}
