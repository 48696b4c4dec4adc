"""Eval pipeline pieces without a model: options, data, prompts, artifacts, throughput, report."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from dllm_generation.eval import artifacts
from dllm_generation.eval.cli import main
from dllm_generation.eval.data import DataUnavailableError, load_task_data
from dllm_generation.eval.options import EvalOptions, InvalidOptionError
from dllm_generation.eval.prompts import build_prompt, continuations, render_prompt
from dllm_generation.eval.report import build_report
from dllm_generation.eval.throughput import summarize_throughput

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"
needs_data = pytest.mark.skipif(not DATA.is_dir(), reason=f"shared data folder {DATA} is absent (it sits beside the repo)")


# ---------------------------------------------------------------------------- options
@pytest.mark.parametrize(
    "changes, field, allowed",
    [
        ({"k": 0}, "k=0", ">= 1"),
        ({"subset": "top"}, "subset='top'", "first, middle, last"),
        ({"mode": "cache"}, "mode='cache'", "output, residual"),
        ({"protocol": "custom", "small_block_size": 5}, "small_block_size=5", "divisor"),
        ({"protocol": "custom", "threshold": 1.5}, "threshold=1.5", "0 < threshold <= 1"),
        ({"limit": 0}, "limit=0", ">= 1"),
        ({"layers": [1, 1]}, "layers=[1, 1]", "distinct"),
        ({"task": "math", "protocol": "custom", "num_fewshot": 3}, "num_fewshot=3", "allowed: 0"),
        ({"protocol": "custom", "mmlu_mode": "generative"}, "mmlu_mode='generative'", "only applies to task 'mmlu'"),
        ({"fast_path": "turbo"}, "fast_path='turbo'", "on, off, graphs, compile"),
    ],
)
def test_bad_options_name_field_and_allowed_values(changes, field, allowed):
    with pytest.raises(InvalidOptionError) as err:
        EvalOptions(**{"task": "gsm8k", **changes}).validate()
    assert field in str(err.value) and allowed in str(err.value)


@pytest.mark.parametrize(
    "argv, expected",
    [
        (["--k", "0"], "k=0 is out of range (allowed: an integer >= 1)"),
        (["--subset", "top"], "invalid choice: 'top' (choose from 'first', 'middle', 'last')"),
        (["--mode", "x"], "invalid choice: 'x'"),
    ],
)
def test_cli_rejects_bad_input_before_loading_anything(argv, expected, capsys):
    # The model path does not exist: reaching the loader would give a different error.
    with pytest.raises(SystemExit) as exit_info:
        main("gsm8k", ["--model", "/does/not/exist", *argv])
    assert exit_info.value.code == 2
    assert expected in capsys.readouterr().err


def test_size_flag_takes_a_count_or_a_share():
    from dllm_generation.eval.cli import DEFAULT_SIZE_TEXT, build_parser, parse_size

    assert (parse_size("12"), parse_size("0.5"), parse_size("3/7")) == (12, 0.5, 3 / 7)
    assert DEFAULT_SIZE_TEXT == "3/7" and parse_size(DEFAULT_SIZE_TEXT) == EvalOptions(task="gsm8k").size == 12 / 28
    assert build_parser("gsm8k").parse_args([]).size == 12 / 28
    with pytest.raises(SystemExit) as exit_info:
        main("gsm8k", ["--model", "/does/not/exist", "--size", "half"])
    assert exit_info.value.code == 2
    with pytest.raises(InvalidOptionError, match=r"size=1.5 is out of range \(allowed: an integer >= 1"):
        EvalOptions(task="gsm8k", size=1.5).validate()


def test_config_name_says_what_differs_from_defaults():
    assert EvalOptions(task="gsm8k").config_name() == "k1_first0.429_output"  # the default share, 12 of 28 layers
    assert EvalOptions(task="gsm8k", size=12).config_name() == "k1_first12_output"
    opts = EvalOptions(task="mmlu", protocol="custom", k=3, subset="last", size=4, mode="residual", threshold=0.8,
                       max_new_tokens=64, chat_template=False, mmlu_mode="generative", use_block_cache=False)
    assert opts.config_name() == "k3_last4_residual_custom_t0.8_nocache_n64_nochat_gen"
    assert EvalOptions(task="mmlu", protocol="paper").config_name() == "k1_first0.429_output_paper"
    assert EvalOptions(task="gsm8k", k=2, layers=[0, 5]).config_name() == "k2_layers0-5_output"
    assert EvalOptions(task="gpqa", seed=3, dtype="bfloat16").config_name() == "k1_first0.429_output_bfloat16_seed3"
    assert EvalOptions(task="gsm8k", run_name="mine", output_dir="out").run_dir() == os.path.join("out", "gsm8k", "mine")
    assert EvalOptions(task="gsm8k", fast_path="compile").config_name() == "k1_first0.429_output_fastcompile"


@pytest.mark.parametrize("flag, value", [("on", None), ("off", False), ("graphs", "graphs"), ("compile", "compile")])
def test_fast_path_flag_reaches_the_generation_config(flag, value):
    from types import SimpleNamespace

    from dllm_generation.eval.model_calls import build_generation_config

    tok = SimpleNamespace(pad_token_id=0, eos_token_id=1)
    cfg = build_generation_config(EvalOptions(task="gsm8k", fast_path=flag).validate(), tok)
    assert cfg.fast_path is value


# ---------------------------------------------------------------------------- data
@needs_data
def test_local_jsonl_tasks_load_with_ids_and_limit():
    gsm = load_task_data(EvalOptions(task="gsm8k", limit=3, data_files=[str(DATA / "gsm8k" / "test.jsonl")]))
    assert [e.id for e in gsm.examples] == ["gsm8k-0", "gsm8k-1", "gsm8k-2"]
    assert gsm.source["total"] == 1319 and gsm.source["count"] == 3 and gsm.source["split"] == "test"
    assert "#### 18" in gsm.examples[0].doc["answer"]

    math = load_task_data(EvalOptions(task="math", limit=2, data_files=[str(DATA / "math500" / "test.jsonl")]))
    assert math.examples[0].id == "test/precalculus/807.json" and math.source["total"] == 500

    ifeval = load_task_data(EvalOptions(task="ifeval", data_files=[str(DATA / "ifeval" / "input_data.jsonl")]))
    assert ifeval.source["total"] == 541 and ifeval.examples[0].id == "1000"
    assert len({e.id for e in ifeval.examples}) == 541


@needs_data
def test_mmlu_csv_folder_reads_every_row_and_dev_shots():
    data = load_task_data(EvalOptions(task="mmlu", protocol="paper", data_files=[str(DATA / "mmlu")]))
    assert data.source["total"] == 14042
    assert len(data.fewshot) == 57 and all(len(v) == 5 for v in data.fewshot.values())
    first = data.examples[0]
    assert first.id == "abstract_algebra/0" and first.doc["subject"] == "abstract_algebra"
    assert len(first.doc["choices"]) == 4 and first.doc["answer_letter"] == "ABCD"[first.doc["answer"]]
    with open(DATA / "mmlu" / "row_counts.csv", newline="") as f:
        expected = {row[0]: int(row[2]) for row in csv.reader(f) if row[0] not in ("subject", "TOTAL")}
    counts: dict[str, int] = {}
    for ex in data.examples:
        counts[ex.doc["subject"]] = counts.get(ex.doc["subject"], 0) + 1
    assert counts == expected


def _write_gpqa_csv(path: Path, n: int = 4) -> Path:
    with open(path, "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(["Record ID", "Question", "Correct Answer", "Incorrect Answer 1", "Incorrect Answer 2",
                         "Incorrect Answer 3", "Subdomain"])
        for i in range(n):
            writer.writerow([f"rec{i}", f"What is {i} + {i}?\nThink.", str(2 * i), str(2 * i + 1), str(2 * i + 2),
                             str(2 * i + 3), "arithmetic"])
    return path


def test_gpqa_choices_shuffled_as_lm_eval_and_independent_of_limit(tmp_path):
    path = _write_gpqa_csv(tmp_path / "gpqa_main.csv", n=12)
    a = load_task_data(EvalOptions(task="gpqa", data_files=[str(path)]))
    b = load_task_data(EvalOptions(task="gpqa", data_files=[str(path)], limit=2))
    assert [e.doc["choices"] for e in a.examples[:2]] == [e.doc["choices"] for e in b.examples]
    for ex in a.examples:
        assert ex.doc["choices"][ex.doc["answer"]] == ex.doc["Correct Answer"]
        assert sorted(ex.doc["choices"]) == sorted([ex.doc["Correct Answer"], *(ex.doc[f"Incorrect Answer {i}"] for i in (1, 2, 3))])
    assert len({e.doc["answer"] for e in a.examples}) > 1  # the gold is not always in the same slot
    other = load_task_data(EvalOptions(task="gpqa", data_files=[str(path)], seed=1))
    assert [e.doc["choices"] for e in other.examples] == [e.doc["choices"] for e in a.examples]  # lm-eval's fixed 42


def test_hub_unreachable_names_what_was_tried_and_local_files(monkeypatch, tmp_path):
    datasets = pytest.importorskip("datasets")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True, raising=False)
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path, raising=False)
    with pytest.raises(DataUnavailableError) as err:
        load_task_data(EvalOptions(task="gsm8k", dataset="no-such-org/no-such-gsm8k"))
    msg = str(err.value)
    assert "no-such-org/no-such-gsm8k" in msg and "split='test'" in msg and "--data-files" in msg


def test_without_datasets_installed_hub_error_says_so(monkeypatch):
    monkeypatch.setitem(sys.modules, "datasets", None)
    with pytest.raises(DataUnavailableError, match="not installed.*--data-files"):
        load_task_data(EvalOptions(task="ifeval"))


def test_missing_local_file_is_rejected_by_name(tmp_path):
    with pytest.raises(InvalidOptionError, match="data_files"):
        EvalOptions(task="gsm8k", data_files=[str(tmp_path / "nope.jsonl")]).validate()


def test_package_imports_without_datasets_evaluate_accelerate():
    code = (
        "import sys\n"
        "for name in ('datasets', 'evaluate', 'accelerate'): sys.modules[name] = None\n"
        "import dllm_generation.eval, dllm_generation.eval.cli, dllm_generation.eval.runner\n"
        "import dllm_generation.eval.grid, dllm_generation.eval.report\n"
        "print('ok')\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr


# ---------------------------------------------------------------------------- prompts
@pytest.fixture(scope="module")
def tokenizer():
    if not (DATA / "qwen2_tokenizer").is_dir():
        pytest.skip(f"tokenizer folder {DATA / 'qwen2_tokenizer'} is absent")
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(DATA / "qwen2_tokenizer"))


def test_mmlu_prompt_is_five_shot_multiturn_and_choices_are_single_tokens(tokenizer):
    shots = [{"question": f"Q{i}", "subject": "anatomy", "choices": ["a", "b", "c", "d"], "answer": i % 4,
              "answer_letter": "ABCD"[i % 4]} for i in range(5)]
    doc = {"question": "Which?", "subject": "anatomy", "choices": ["w", "x", "y", "z"], "answer": 2, "answer_letter": "C"}
    prompt = build_prompt("mmlu", doc, {"anatomy": shots})
    assert len(prompt.messages) == 12 and prompt.messages[2]["content"] == "A"
    assert prompt.messages[0] == {"role": "system",
                                  "content": "The following are multiple choice questions (with answers) about anatomy.\n\n"}
    assert prompt.plain.endswith("Which?\nA. w\nB. x\nC. y\nD. z\nAnswer:") and "Answer: A\n\n" in prompt.plain
    text = tokenizer.decode(render_prompt(tokenizer, prompt, chat_template=True))
    assert text.rstrip().endswith("<|im_start|>assistant") and text.count("<|im_start|>user") == 6
    for chat in (True, False):
        ids = [tokenizer(c, add_special_tokens=False)["input_ids"] for c in continuations("mmlu", chat)]
        assert all(len(i) == 1 for i in ids) and len({i[0] for i in ids}) == 4
    generative = build_prompt("mmlu", doc, {"anatomy": shots}, mmlu_mode="generative")
    assert generative.messages[2]["content"] == "Answer: A" and "'Answer: X'" in generative.messages[-1]["content"]


def test_task_prompts_are_lm_eval_formats(tokenizer):
    gsm = build_prompt("gsm8k", {"question": "2+2?"}, {})
    assert gsm.messages == [{"role": "user", "content": "Question: 2+2?\nAnswer:"}]
    assert build_prompt("math", {"problem": "x?"}, {}).messages[0]["content"] == "Problem:\nx?\n\nSolution:"
    assert build_prompt("ifeval", {"prompt": "Write a haiku."}, {}).messages[0]["content"] == "Write a haiku."
    gpqa = build_prompt("gpqa", {"Question": "Q?", "choices": ["1", "2", "3", "4"]}, {}).messages[-1]["content"]
    assert gpqa == "Question: Q?\nChoices:\n(A) 1\n(B) 2\n(C) 3\n(D) 4\nAnswer:"
    plain = tokenizer.decode(render_prompt(tokenizer, gsm, chat_template=False))
    assert "<|im_start|>" not in plain and plain.endswith("within \\boxed{{}}.")


# ---------------------------------------------------------------------------- artifacts
def test_atomic_json_and_torn_line_repair(tmp_path):
    files = artifacts.RunFiles(str(tmp_path / "run"))
    files.append([{"id": "a", "index": 0}, {"id": "b", "index": 1}], {"tokens": 3, "wall_seconds": 1.0})
    with open(files.samples_path(), "a") as f:
        f.write('{"id": "c", "ind')  # a crash in the middle of a write
    records, bad = artifacts.read_jsonl(files.samples_path())
    assert [r["id"] for r in records] == ["a", "b"] and bad == 1
    files.repair()
    files.append([{"id": "c", "index": 2}], {"tokens": 1, "wall_seconds": 1.0})
    assert [r["id"] for r in files.finished_samples()] == ["a", "b", "c"]
    artifacts.write_json_atomic(files.summary, {"x": 1})
    assert json.loads(Path(files.summary).read_text()) == {"x": 1}
    assert not [p for p in os.listdir(files.dir) if p.endswith(".tmp")]
    assert oct(os.stat(files.summary).st_mode & 0o044) != "0o0"  # readable by others, not mkstemp's 0600


def test_a_sample_line_without_its_row_id_is_dropped_and_its_batch_redone(tmp_path):
    files = artifacts.RunFiles(str(tmp_path / "run"))
    files.append([{"id": "a", "index": 0}, {"id": "b", "index": 1}], {"ids": ["a", "b"], "tokens": 3})
    files.append([{"id": "c", "index": 2}, {"id": "d", "index": 3}], {"ids": ["c", "d"], "tokens": 4})
    lines = Path(files.samples_path()).read_text().splitlines(keepends=True)
    lines[3] = '{"index": 3, "prediction": "x"}\n'  # valid JSON, no id
    Path(files.samples_path()).write_text("".join(lines))
    assert [r["id"] for r in files.finished_samples()] == ["a", "b", "c"]
    files.repair()
    assert [r["id"] for r in files.finished_samples()] == ["a", "b"]  # c's batch goes back, whole
    assert [b["ids"] for b in files.batch_records()] == [["a", "b"]]


def test_rank_files_merge_into_one_samples_file(tmp_path):
    r0, r1 = artifacts.RunFiles(str(tmp_path), 0), artifacts.RunFiles(str(tmp_path), 1)
    r1.append([{"id": "y", "index": 1}], {"rank": 1})
    r0.append([{"id": "x", "index": 0}], {"rank": 0})
    merged = sorted(r0.finished_samples(), key=lambda r: r["index"])
    r0.consolidate(merged, r0.batch_records())
    assert sorted(os.listdir(tmp_path)) == ["batches.jsonl", "samples.jsonl"]
    assert [r["id"] for r in artifacts.read_jsonl(r0.samples_path())[0]] == ["x", "y"]


def test_throughput_sums_batches_and_derives_rates():
    batches = [
        {"rank": 0, "size": 2, "tokens": 60, "generated_tokens": 60, "forwards": 10, "wall_seconds": 2.0,
         "layer_calls": 30, "layer_calls_skipped": 10, "denoising_steps": 8},
        {"rank": 1, "size": 2, "tokens": 40, "generated_tokens": 40, "forwards": 10, "wall_seconds": 3.0,
         "layer_calls": 40, "layer_calls_skipped": 0, "denoising_steps": 8},
    ]
    t = summarize_throughput(batches, token_kind="generated", warmup={"batches": 1, "counted": False})
    assert t["tokens"] == 100 and t["wall_seconds"] == 5.0 and t["tokens_per_second"] == 20.0
    assert t["tokens_per_forward"] == 5.0 and t["layer_skip_fraction"] == 0.125 and t["processes"] == 2
    assert t["aggregate_tokens_per_second"] == pytest.approx(100 / 3) and t["prompts"] == 4
    assert t["warmup"]["counted"] is False


# ---------------------------------------------------------------------------- report
def _summary(task, config, k, acc, tps):
    return {
        "task": task, "config": config, "primary_metric": "acc", "accuracy": acc, "counts": {"samples": 4},
        "throughput": {"tokens_per_second": tps, "tokens_per_forward": 2.0, "layer_skip_fraction": 0.1, "tokens": 80},
        "generation": {"k": k, "layer_reuse": None if k == 1 else {"k": k, "subset": "first", "size": 12, "layers": None, "mode": "output"},
                       "block_size": 32, "small_block_size": 8, "threshold": 0.9, "use_block_cache": True,
                       "max_new_tokens": 64, "batch_size": 2},
        "options": {"model": "m", "chat_template": True, "num_fewshot": None, "mmlu_mode": "loglikelihood"},
        "dataset": {"count": 4}, "environment": {"device_name": "Test CPU"},
    }


def test_report_records_the_path_that_ran_and_flags_throughput_that_is_not_comparable(tmp_path):
    rows = [("k1_first12_output", "cuda:0", False, "graphs"), ("k2_first12_output", "cuda:0", True, "graphs"),
            ("k3_first12_output", "cpu", False, "off (device is cpu, not CUDA)")]
    for config, device, busy, path in rows:
        s = _summary("gpqa", config, int(config[1]), 0.5, 10.0)
        s["environment"].update(device=device, busy=busy, cpu_count=2, load_average_before=[3.5, 1.0, 0.5])
        s["generation"]["fast_path"] = path
        artifacts.write_json_atomic(str(tmp_path / "gpqa" / config / "summary.json"), s)
    text = Path(build_report(str(tmp_path), plots=False)).read_text()
    lines = {line.split(" | ")[0][2:]: line for line in text.splitlines() if line.startswith("| k")}
    assert lines["k1_first12_output"].endswith("| graphs |  |")
    assert "busy host (load 3.5 on 2 CPUs): tok/s not comparable" in lines["k2_first12_output"]
    assert "| off (device is cpu, not CUDA) | CPU: tok/s not comparable |" in lines["k3_first12_output"]
    assert "2 of 3 runs have throughput that is not comparable" in text


def test_plot_labels_never_overlap_and_the_metric_axis_stays_within_0_and_100_percent(tmp_path):
    import matplotlib

    matplotlib.use("Agg")
    from dllm_generation.eval.report import draw_task

    runs = [_summary("gsm8k", f"k{1 + i % 3}_first{i}_output_with_a_long_name", 1 + i % 3, 0.999 if i < 20 else 0.001,
                     100.0 + (i % 2)) for i in range(24)]  # two tight clusters at the edges of the range
    fig = draw_task("gsm8k", runs)
    ax = fig.axes[0]
    fig.canvas.draw()  # places every annotation
    renderer = fig.canvas.get_renderer()
    from matplotlib.text import Text

    boxes = [Text.get_window_extent(t, renderer) for t in ax.texts]  # the label itself, without its leader line
    assert len(boxes) == 24
    for i, a in enumerate(boxes):
        for b in boxes[i + 1:]:
            assert not a.overlaps(b), (a, b)
    low, high = ax.get_ylim()
    assert 0.0 <= low < high <= 1.0 and ax.get_xlim()[0] == 0.0
    assert all(0 <= box.y0 and box.y1 <= fig.bbox.height for box in boxes)  # every label inside the figure


def test_report_help_tells_plots_are_on(capsys):
    from dllm_generation.eval.cli import report_main

    with pytest.raises(SystemExit):
        report_main(["--help"])
    help_text = " ".join(capsys.readouterr().out.split())
    assert "--plots, --no-plots" in help_text and "(default: True)" in help_text
    assert "--no-plots (default: True)" not in help_text


def test_report_table_speedup_and_plot(tmp_path):
    for config, k, acc, tps in [("k1_first12_output", 1, 0.5, 10.0), ("k1_last12_output", 1, 0.5, 30.0),
                                ("k2_first12_output", 2, 0.25, 40.0)]:
        artifacts.write_json_atomic(str(tmp_path / "gpqa" / config / "summary.json"), _summary("gpqa", config, k, acc, tps))
    path = build_report(str(tmp_path))
    text = Path(path).read_text()
    assert "## gpqa" in text and "Test CPU" in text
    row = next(line for line in text.splitlines() if line.startswith("| k2_first12_output"))
    assert "| 2.00x |" in row and "| 0.2500 |" in row and "| 40.0 |" in row
    png = tmp_path / "plots" / "gpqa_accuracy_vs_throughput.png"
    assert png.read_bytes()[:4] == b"\x89PNG" and "plots/gpqa_accuracy_vs_throughput.png" in text


def test_a_busy_host_is_other_processes_cpu_use_not_this_processes_own():
    """The load average counts this process too (a grid's previous configuration keeps it high); the
    sampled measure counts only other processes."""
    import subprocess
    import sys
    import threading
    import time

    from dllm_generation.eval.provenance import is_busy, other_cpu_use

    stop = time.monotonic() + 1.0

    def spin():
        while time.monotonic() < stop:
            pass

    thread = threading.Thread(target=spin)
    thread.start()
    own = other_cpu_use(0.5)  # this process busy on one core
    thread.join()
    child = subprocess.Popen([sys.executable, "-c", "import time\nend = time.monotonic() + 1.5\nwhile time.monotonic() < end: pass"])
    time.sleep(0.2)
    other = other_cpu_use(0.5)  # another process busy on one core
    child.wait()
    assert other - own > 0.5, (own, other)
    assert is_busy({"cpu_count": 2, "other_cpu_use": 1.2, "load_average": [0.1, 0, 0]})
    assert not is_busy({"cpu_count": 2, "other_cpu_use": 0.1, "load_average": [3.5, 1.0, 0.5]})
    assert is_busy({"cpu_count": 2, "load_average": [3.5, 1.0, 0.5]})  # not sampled: the load average decides
    from dllm_generation.eval.report import comparability

    note = comparability({"environment": {"device": "cuda:0", "busy": True, "cpu_count": 2, "other_cpu_use_before": 1.4}})
    assert note == "busy host (other processes used 1.4 of 2 CPUs): tok/s not comparable"


def test_the_fast_path_label_says_what_fell_back_inside_the_engine():
    from dllm_generation.eval.model_calls import fast_path_label

    assert fast_path_label(None) is None
    assert fast_path_label("off (device is cpu, not CUDA)") == "off (device is cpu, not CUDA)"
    ran = {"mode": "compile", "compile_failure": None, "graph_failure": None, "prefill_failure": None}
    assert fast_path_label(ran) == "compile"
    assert fast_path_label(ran | {"prefill_failure": "RuntimeError: x"}) == "compile (prefill capture failed: eager prefills)"
    assert fast_path_label(ran | {"graph_failure": "out of memory while capturing"}) == \
        "compile (graph capture failed: uncaptured passes)"
    assert fast_path_label(ran | {"compile_failure": "x"}) == "compile (torch.compile failed: uncompiled layers)"


def test_report_prints_a_reuse_share_as_its_label_and_the_layers_it_resolved_to(tmp_path):
    s = _summary("gpqa", "k2_first0.429_output", 2, 0.5, 10.0)
    s["generation"]["layer_reuse"].update(size=3 / 7, resolved_layers=[1, 2, 3, 4, 5, 6])
    artifacts.write_json_atomic(str(tmp_path / "gpqa" / "k2_first0.429_output" / "summary.json"), s)
    text = Path(build_report(str(tmp_path), plots=False)).read_text()
    line = next(line for line in text.splitlines() if line.startswith("| k2_first0.429_output"))
    assert "| first 0.429 (6 layers) |" in line and "0.428571" not in line
