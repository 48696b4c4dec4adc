"""Prompts byte-identical to lm-evaluation-harness 0.4.9's own rendering, from the same offline data.

lm-eval builds the requests of the first 20 documents of each task (its installed task YAMLs,
`--apply_chat_template --fewshot_as_multiturn`, the tokenizer's chat template); the pipeline's
prompt for the same rows must equal them, after the reference model class's rewrite.
"""

from __future__ import annotations

import csv
import os
from pathlib import Path

import pytest

pytest.importorskip("lm_eval")

from dllm_generation.eval.data import load_task_data  # noqa: E402
from dllm_generation.eval.options import EvalOptions  # noqa: E402
from dllm_generation.eval.prompts import build_prompt, continuations, encode_pair, render_text  # noqa: E402
from dllm_generation.eval.protocols import reference_rewrite  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
DATA = REPO.parent / "shared" / "data"
N = 20
pytestmark = [pytest.mark.skipif(not DATA.is_dir(), reason=f"shared data folder {DATA} is absent"),
              pytest.mark.usefixtures("no_network")]


@pytest.fixture(scope="module")
def tokenizer():
    from dllm_generation.loading import _load_tokenizer

    return _load_tokenizer(str(DATA / "qwen2_tokenizer"))


@pytest.fixture(scope="module")
def datasets_cache(tmp_path_factory):
    """A fresh `datasets` cache, so lm-eval's map() runs (and caches) exactly as on a first run."""
    import datasets

    path = tmp_path_factory.mktemp("hf_datasets")
    old = datasets.config.HF_DATASETS_CACHE
    datasets.config.HF_DATASETS_CACHE = path
    yield path
    datasets.config.HF_DATASETS_CACHE = old


def lm_eval_requests(task, tokenizer, *, num_fewshot: int, limit: int = N):
    """lm-eval's (ctx, continuation-or-gen_kwargs) per document, grouped by doc."""
    task.set_config(key="num_fewshot", value=num_fewshot)
    task.set_fewshot_seed(seed=1234)

    def chat(history, add_generation_prompt=True):
        return tokenizer.apply_chat_template(history, add_generation_prompt=add_generation_prompt, tokenize=False)

    task.build_all_requests(limit=limit, apply_chat_template=True, fewshot_as_multiturn=True, chat_template=chat)
    by_doc: dict[int, list] = {}
    for inst in task.instances:
        by_doc.setdefault(inst.doc_id, []).append(inst)
    return [sorted(by_doc[i], key=lambda x: x.idx) for i in sorted(by_doc)]


def our_texts(task: str, files: list[str], tokenizer, *, protocol: str = "fork", limit: int = N, **kw):
    options = EvalOptions(task=task, protocol=protocol, data_files=files, limit=limit, **kw).validate()
    data = load_task_data(options)
    return [render_text(tokenizer, build_prompt(task, ex.doc, data.fewshot), chat_template=True)
            for ex in data.examples], data


def test_gsm8k_prompts_equal_lm_eval(tokenizer, datasets_cache, tmp_path):
    from dllm_generation.lmeval.local_tasks import local_tasks

    (task,) = local_tasks(["gsm8k"], data_dir=str(DATA), workdir=str(tmp_path))
    theirs = lm_eval_requests(task, tokenizer, num_fewshot=0)
    ours, _ = our_texts("gsm8k", [str(DATA / "gsm8k" / "test.jsonl")], tokenizer)
    assert len(theirs) == len(ours) == N
    for insts, text in zip(theirs, ours):
        assert reference_rewrite(insts[0].task_name, insts[0].args[0]) == text
    # The reference's quirks, byte for byte: "Question: " kept, two braces.
    assert "user\nQuestion: " in ours[0] and ours[0].count("\\boxed{{}}.") == 1 and "Answer:" not in ours[0]


@pytest.mark.parametrize("task", ["math", "minerva_math"])
def test_math_prompts_equal_lm_eval(task, tokenizer, datasets_cache, tmp_path):
    from dllm_generation.lmeval.local_tasks import local_tasks

    if task == "math":
        theirs_tasks = local_tasks(["minerva_math500"], data_dir=str(DATA), workdir=str(tmp_path))
    else:
        theirs_tasks = local_tasks(["minerva_math"], data_dir=str(DATA), workdir=str(tmp_path))
    theirs = [insts for t in theirs_tasks for insts in lm_eval_requests(t, tokenizer, num_fewshot=0)]
    ours, data = our_texts(task, [str(DATA / "math500" / "test.jsonl")], tokenizer, limit=None)
    if task == "minerva_math":  # lm-eval serves 20 per subject; ours in the same subject order
        wanted = {}
        keep = []
        for ex, text in zip(data.examples, ours):
            subject = ex.id.split("/")[0]
            if wanted.get(subject, 0) < N:
                wanted[subject] = wanted.get(subject, 0) + 1
                keep.append(text)
        ours = keep
    else:
        ours = ours[:N]
    assert len(theirs) == len(ours) >= N
    for insts, text in zip(theirs, ours):
        assert reference_rewrite(insts[0].task_name, insts[0].args[0]) == text
    assert "Problem:\n" in ours[0] and "\\boxed{{}}." in ours[0] and "Solution:" not in ours[0]


def test_ifeval_prompts_equal_lm_eval(tokenizer, datasets_cache, tmp_path):
    from dllm_generation.lmeval.local_tasks import local_tasks

    (task,) = local_tasks(["ifeval"], data_dir=str(DATA), workdir=str(tmp_path))
    theirs = lm_eval_requests(task, tokenizer, num_fewshot=0)
    ours, _ = our_texts("ifeval", [str(DATA / "ifeval" / "input_data.jsonl")], tokenizer)
    assert [reference_rewrite(i[0].task_name, i[0].args[0]) for i in theirs] == ours


@pytest.mark.parametrize(("protocol", "shots"), [("fork", 0), ("paper", 5)])
def test_mmlu_requests_equal_lm_eval(protocol, shots, tokenizer, datasets_cache, tmp_path):
    from dllm_generation.lmeval.local_tasks import mmlu_tasks

    subjects = ["abstract_algebra", "high_school_us_history", "professional_law"]
    tasks = mmlu_tasks(str(DATA / "mmlu"), str(tmp_path), subjects=subjects)
    options = EvalOptions(task="mmlu", protocol=protocol, data_files=[str(DATA / "mmlu")]).validate()
    assert options.num_fewshot == shots
    data = load_task_data(options)
    for task, subject in zip(tasks, subjects):
        theirs = lm_eval_requests(task, tokenizer, num_fewshot=shots)
        rows = [ex for ex in data.examples if ex.doc["subject"] == subject][:N]
        assert len(theirs) == len(rows) == N
        for insts, ex in zip(theirs, rows):
            text = render_text(tokenizer, build_prompt("mmlu", ex.doc, data.fewshot), chat_template=True)
            assert [i.args for i in insts] == [(text, c) for c in continuations("mmlu", True)]
            # The subject line is the system message (the default system prompt is replaced).
            assert text.startswith("<|im_start|>system\nThe following are multiple choice questions")
            assert "You are a helpful assistant" not in text
            assert text.count("<|im_start|>assistant\n") == shots + 1
            # Token split as the reference model class makes it: the letter is one token after the context.
            context_ids, cont_ids = encode_pair(tokenizer, text, "A")
            assert len(cont_ids) == 1 and tokenizer.decode(cont_ids) == "A"


def write_gpqa_csv(path: Path, n: int = 25) -> Path:
    """Made-up rows in the GPQA release layout (the real set is not redistributed)."""
    with open(path, "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(["Record ID", "Question", "Correct Answer", "Incorrect Answer 1", "Incorrect Answer 2",
                    "Incorrect Answer 3"])
        for i in range(n):
            w.writerow([f"rec{i:03d}", f"  Which value does item {i} take? [see note]\nExplain.  ",
                        f" right {i} [title] tail", f"wrong  a{i}", f"[x] wrong b{i}", f"wrong c{i} [ref 2]"])
    return path


def gpqa_task(csv_path: Path, workdir: Path):
    from dllm_generation.lmeval.local_tasks import local_tasks

    (task,) = local_tasks(["gpqa_main_n_shot"], data_dir=str(DATA), workdir=str(workdir), gpqa_csv=str(csv_path))
    return task


def test_gpqa_requests_equal_lm_eval_warm_cache(tokenizer, datasets_cache, tmp_path):
    """lm-eval on a warm `datasets` cache: every pass over the docs is the first shuffle of Random(42)."""
    csv_path = write_gpqa_csv(tmp_path / "gpqa_main.csv")
    gpqa_task(csv_path, tmp_path)  # a first run fills the cache
    task = gpqa_task(csv_path, tmp_path)
    theirs = lm_eval_requests(task, tokenizer, num_fewshot=0)
    ours, data = our_texts("gpqa", [str(csv_path)], tokenizer)
    assert len(theirs) == len(ours) == N
    scored_docs = list(task.eval_docs)  # what lm-eval's process_results reads the gold from
    for insts, text, ex, doc in zip(theirs, ours, data.examples, scored_docs):
        assert [i.args for i in insts] == [(text, c) for c in continuations("gpqa", True)]
        assert doc == insts[0].doc and f"({ex.doc['answer_letter']})" == doc["answer"]
    assert ours[0].startswith("<|im_start|>system\nHere are some example questions from experts.")
    assert len({ex.doc["answer_letter"] for ex in data.examples}) > 1  # the shuffle moved the right answer


def test_gpqa_cold_cache_lm_eval_rescores_against_another_shuffle(tmp_path):
    """Why the pipeline follows the warm-cache order: on a cold cache each pass over lm-eval's GPQA docs
    draws new shuffles (its Random(42) is module state), so the docs it scores differ from those it prompted."""
    import datasets

    old = datasets.config.HF_DATASETS_CACHE
    datasets.config.HF_DATASETS_CACHE = tmp_path / "cold"
    try:
        task = gpqa_task(write_gpqa_csv(tmp_path / "gpqa_main.csv"), tmp_path)
        assert list(task.eval_docs) != list(task.eval_docs)
    finally:
        datasets.config.HF_DATASETS_CACHE = old


def test_prompts_are_what_the_model_reads(tokenizer):
    """Token ids are the tokenizer's defaults over the rewritten text (no special tokens added for Qwen)."""
    options = EvalOptions(task="gsm8k", data_files=[str(DATA / "gsm8k" / "test.jsonl")], limit=1).validate()
    ex = load_task_data(options).examples[0]
    text = render_text(tokenizer, build_prompt("gsm8k", ex.doc, {}), chat_template=True)
    assert tokenizer.decode(tokenizer(text)["input_ids"]) == text
    assert os.path.basename(str(DATA / "gsm8k"))
