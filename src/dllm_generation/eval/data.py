"""Benchmark rows for each task, from the Hugging Face Hub or from local files, in one shape.

Hub ids go through `datasets.load_dataset` (imported lazily: the GPU box may not have it).
Local JSON Lines / JSON / CSV files are read with the standard library, so an offline machine
without `datasets` can still evaluate. Every row becomes an `Example(id, doc)`; the `doc` keeps
the source fields and, for multiple-choice tasks, adds `choices` / `answer` (index) /
`answer_letter` so prompts and metrics read one schema whatever the source.
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

logger = logging.getLogger(__name__)

LETTERS = "ABCD"
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
    """Read the evaluation rows (and few-shot rows when the prompt needs them) for `options.task`."""
    task = options.task
    need_fewshot = options.fewshot > 0
    if options.data_files:
        rows, fewshot_rows, source = _read_local(task, options.data_files, options.fewshot_files, need_fewshot)
    elif task == "arith" and not options.dataset:
        rows, fewshot_rows, source = _read_local(task, [arith_test_set_path()], None, False)
    else:
        hub = HUB_SOURCES.get(task, HubSource(options.dataset, None, "test"))
        hub = HubSource(
            options.dataset or hub.path,
            options.dataset_config if options.dataset_config is not None else hub.config,
            options.split or hub.split,
            hub.fewshot_split,
        )
        rows, fewshot_rows, source = _read_hub(task, hub, need_fewshot)
    examples = _to_examples(task, rows, seed=options.seed)
    total = len(examples)
    if options.limit is not None:
        examples = examples[: options.limit]
    fewshot = _fewshot_pool(task, fewshot_rows, options.fewshot, seed=options.seed) if need_fewshot else {}
    source.update(total=total, count=len(examples), limit=options.limit, num_fewshot=options.fewshot)
    return TaskData(examples=examples, fewshot=fewshot, source=source)


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
            f"cannot load {task} data from {tried}: {type(err).__name__}: {str(err).rstrip('.')}. "
            f"If this machine is offline or the dataset is gated, pass local files: {LOCAL_HINTS[task]}"
        ) from err
    return ds.to_list()


# ---------------------------------------------------------------------------- local files
def _read_local(task: str, data_files: list[str], fewshot_files: list[str] | None, need_fewshot: bool):
    if task == "mmlu":
        return _read_local_mmlu(data_files, fewshot_files, need_fewshot)
    files = _expand(data_files, task)
    rows = [row for path in files for row in _read_file(path, task)]
    fewshot_rows = None
    if need_fewshot:
        fs_files = _expand(fewshot_files, task) if fewshot_files else _sibling_train(files)
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


def _expand(paths: list[str], task: str) -> list[str]:
    """Files named directly, plus the data files inside named folders (sorted)."""
    out: list[str] = []
    for path in paths:
        if os.path.isdir(path):
            found = sorted(p for p in glob.glob(os.path.join(path, "*")) if p.endswith(LOCAL_SUFFIXES))
            if not found:
                raise DataUnavailableError(
                    f"no {', '.join(LOCAL_SUFFIXES)} files in folder {path!r}; expected {LOCAL_HINTS[task]}"
                )
            out.extend(found)
        elif os.path.isfile(path):
            out.append(path)
        else:
            raise DataUnavailableError(f"data file {path!r} does not exist; expected {LOCAL_HINTS[task]}")
    return out


def _sibling_train(files: list[str]) -> list[str]:
    candidate = os.path.join(os.path.dirname(os.path.abspath(files[0])), "train.jsonl")
    return [candidate] if os.path.isfile(candidate) and os.path.abspath(files[0]) != candidate else []


def _split_from_name(path: str) -> str:
    stem = os.path.splitext(os.path.basename(path))[0]
    for split in ("test", "train", "validation", "dev", "val"):
        if stem == split or stem.endswith("_" + split):
            return split
    return stem


def _read_file(path: str, task: str, *, columns: tuple[str, ...] | None = None) -> list[dict]:
    """Rows of one JSON Lines / JSON / CSV / Parquet file as dicts."""
    try:
        if path.endswith(".jsonl"):
            with open(path, encoding="utf-8") as f:
                return [json.loads(line) for line in f if line.strip()]
        if path.endswith(".json"):
            with open(path, encoding="utf-8") as f:
                text = f.read()
            try:
                data = json.loads(text)
            except json.JSONDecodeError:  # JSON Lines saved as .json
                return [json.loads(line) for line in text.splitlines() if line.strip()]
            if isinstance(data, dict):
                data = data.get("data") or data.get("rows") or next(iter(data.values()))
            return list(data)
        if path.endswith(".csv"):
            # newline="" lets the csv module handle CRLF and quoted fields spanning lines.
            with open(path, encoding="utf-8", newline="") as f:
                if columns is None:
                    return [dict(row) for row in csv.DictReader(f)]
                return [dict(zip(columns, row)) for row in csv.reader(f) if row]
        if path.endswith(".parquet"):
            import pandas

            return pandas.read_parquet(path).to_dict(orient="records")
    except (OSError, ValueError, csv.Error) as err:
        raise DataUnavailableError(f"cannot read {task} data file {path!r}: {err}") from err
    raise DataUnavailableError(f"unsupported data file {path!r} (allowed: {', '.join(LOCAL_SUFFIXES)})")


def _read_local_mmlu(data_files, fewshot_files, need_fewshot):
    """MMLU release layout: one headerless CSV per subject, `<subject>_test.csv` / `<subject>_dev.csv`."""
    test_files, dev_files = [], []
    for path in data_files:
        if os.path.isdir(path) and os.path.isdir(os.path.join(path, "test")):
            test_files += _csvs(os.path.join(path, "test"))
            if os.path.isdir(os.path.join(path, "dev")):
                dev_files += _csvs(os.path.join(path, "dev"))
        elif os.path.isdir(path):
            test_files += _csvs(path)
            sibling = os.path.join(os.path.dirname(os.path.abspath(path)), "dev")
            if os.path.isdir(sibling) and os.path.abspath(path) != sibling:
                dev_files += _csvs(sibling)
        else:
            test_files += _expand([path], "mmlu")
    if fewshot_files:
        dev_files = [p for f in fewshot_files for p in (_csvs(f) if os.path.isdir(f) else [f])]
    if not test_files:
        raise DataUnavailableError(f"no MMLU CSV files found in {data_files!r}; expected {LOCAL_HINTS['mmlu']}")
    if need_fewshot and not dev_files:
        raise DataUnavailableError(
            f"MMLU few-shot prompts need the dev split: no dev/ CSVs found for {data_files!r}; "
            "pass --fewshot-files <mmlu>/dev or --num-fewshot 0"
        )
    rows = _mmlu_rows(test_files)
    source = {"kind": "files", "files": [os.path.abspath(p) for p in test_files], "split": "test"}
    fewshot_rows = None
    if need_fewshot:
        fewshot_rows = _mmlu_rows(dev_files)
        source["fewshot_files"] = [os.path.abspath(p) for p in dev_files]
        source["fewshot_split"] = "dev"
    return rows, fewshot_rows, source


def _csvs(folder: str) -> list[str]:
    found = sorted(glob.glob(os.path.join(folder, "*.csv")))
    if not found:
        raise DataUnavailableError(f"no CSV files in MMLU folder {folder!r}; expected {LOCAL_HINTS['mmlu']}")
    return found


def _mmlu_rows(files: list[str]) -> list[dict]:
    rows = []
    for path in files:
        stem = os.path.splitext(os.path.basename(path))[0]
        subject = stem.rsplit("_", 1)[0] if stem.rsplit("_", 1)[-1] in ("test", "dev", "val") else stem
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
