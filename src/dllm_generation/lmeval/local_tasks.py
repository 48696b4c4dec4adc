"""lm-eval's own task objects over local data files, for machines without Hub access.

Each task is built from lm-eval's installed YAML (prompt, filters, metrics, process_docs: all
lm-eval's) with only the data source replaced: ``dataset_path`` becomes a packaged `datasets`
builder (``json`` / ``csv``) over local files, which loads offline. Files whose layout differs from
the Hub's (the MMLU release CSVs) are first written as JSON Lines in the Hub schema into `workdir`.

    import lm_eval, dllm_generation.lmeval
    from dllm_generation.lmeval.local_tasks import local_tasks
    tasks = local_tasks(["gsm8k", "mmlu"], data_dir="shared/data", workdir="/tmp/lmeval_data")
    lm_eval.simple_evaluate(model="dllm_generation", model_args="pretrained=...", tasks=tasks,
                            num_fewshot=0, apply_chat_template=True, fewshot_as_multiturn=True)
"""

from __future__ import annotations

import json
import os

from ..eval.artifacts import write_jsonl_atomic
from ..eval.data import MINERVA_MATH_SUBJECTS, math_subject

# lm-eval subtask name of each MATH subject (its minerva_math group).
MINERVA_TASK_OF = {
    "algebra": "minerva_math_algebra",
    "counting_and_probability": "minerva_math_counting_and_prob",
    "geometry": "minerva_math_geometry",
    "intermediate_algebra": "minerva_math_intermediate_algebra",
    "number_theory": "minerva_math_num_theory",
    "prealgebra": "minerva_math_prealgebra",
    "precalculus": "minerva_math_precalc",
}
LOCAL_TASKS = ("gsm8k", "minerva_math500", "minerva_math", "ifeval", "mmlu", "gpqa_main_n_shot")

_MANAGER = None


def task_manager():
    """One lm-eval TaskManager per process (indexing lm-eval's YAML files takes seconds)."""
    global _MANAGER
    if _MANAGER is None:
        from lm_eval.tasks import TaskManager

        _MANAGER = TaskManager()
    return _MANAGER


def build_task(name: str, data_files: dict[str, str], builder: str = "json", **overrides):
    """lm-eval's task `name` with its data read by `builder` from `data_files` ({split: path})."""
    from lm_eval.api.task import ConfigurableTask

    config = dict(task_manager()._get_config(name))
    config.update(dataset_path=builder, dataset_name=None, dataset_kwargs={"data_files": data_files}, **overrides)
    return ConfigurableTask(config=config)


def local_tasks(names: list[str], *, data_dir: str, workdir: str, gpqa_csv: str | None = None) -> list:
    """Task objects for `names` (from LOCAL_TASKS) over the files of a data folder laid out like shared/data.

    `minerva_math` is served from MATH-500's rows split by subject when no full MATH copy is
    given (a stand-in with lm-eval's prompts and scoring, not the 5,000-problem test set).
    """
    os.makedirs(workdir, exist_ok=True)
    out = []
    for name in names:
        if name == "gsm8k":
            out.append(build_task("gsm8k", {"test": f"{data_dir}/gsm8k/test.jsonl",
                                            "train": f"{data_dir}/gsm8k/train.jsonl"}))
        elif name == "minerva_math500":
            out.append(build_task("minerva_math500", {"test": f"{data_dir}/math500/test.jsonl"}))
        elif name == "minerva_math":
            out += minerva_math_tasks(f"{data_dir}/math500/test.jsonl", workdir)
        elif name == "ifeval":
            from ..eval.metrics.ifeval import seed_language_detection
            from ..eval.metrics.punkt_offline import ensure_offline_punkt

            ensure_offline_punkt()  # lm-eval's ifeval utils download punkt_tab at import unless NLTK finds it
            seed_language_detection()  # lm-eval's language checks, repeatable as ours
            out.append(build_task("ifeval", {"train": f"{data_dir}/ifeval/input_data.jsonl"}))
        elif name == "mmlu":
            out += mmlu_tasks(f"{data_dir}/mmlu", workdir)
        elif name == "gpqa_main_n_shot":
            if not gpqa_csv:
                raise ValueError("gpqa_main_n_shot needs gpqa_csv= (the GPQA release CSV; it is not redistributed)")
            out.append(build_task("gpqa_main_n_shot", {"train": gpqa_csv}, builder="csv"))
        else:
            raise ValueError(f"no local data recipe for task {name!r} (allowed: {', '.join(LOCAL_TASKS)})")
    return out


def minerva_math_tasks(math_file: str, workdir: str, subjects=MINERVA_MATH_SUBJECTS) -> list:
    """One lm-eval minerva_math_<subject> task per subject, over that subject's rows of `math_file`."""
    with open(math_file, encoding="utf-8") as f:
        rows = [json.loads(line) for line in f if line.strip()]
    tasks = []
    for subject in subjects:
        path = os.path.join(workdir, f"minerva_{subject}.jsonl")
        write_jsonl_atomic(path, [r for r in rows if math_subject(r) == subject])
        tasks.append(build_task(MINERVA_TASK_OF[subject], {"test": path}, training_split=None))
    return tasks


def mmlu_tasks(mmlu_dir: str, workdir: str, subjects: list[str] | None = None) -> list:
    """One lm-eval mmlu_<subject> task per subject, its test/dev CSVs rewritten in the cais/mmlu schema."""
    from ..eval.data import _mmlu_rows

    tests = sorted(f for f in os.listdir(os.path.join(mmlu_dir, "test")) if f.endswith("_test.csv"))
    tasks = []
    for name in tests:
        subject = name[: -len("_test.csv")]
        if subjects is not None and subject not in subjects:
            continue
        paths = {}
        for split in ("test", "dev"):
            rows = _mmlu_rows([os.path.join(mmlu_dir, split, f"{subject}_{split}.csv")])
            paths[split] = os.path.join(workdir, f"mmlu_{subject}_{split}.jsonl")
            write_jsonl_atomic(paths[split], rows)
        tasks.append(build_task(f"mmlu_{subject}", paths))
    return tasks
