"""Each eval script end to end on a tiny random checkpoint and slices of shared/data (offline)."""

from __future__ import annotations

import json
import os
import runpy
import subprocess
import sys
from pathlib import Path

import pytest

from dllm_generation.eval import runner as runner_module
from dllm_generation.eval.artifacts import read_jsonl
from dllm_generation.eval.options import EvalOptions, InvalidOptionError
from dllm_generation.eval.runner import run_eval

REPO = Path(__file__).resolve().parents[1]
DATA = REPO.parent / "shared" / "data"
SCRIPTS = REPO / "eval_scripts"
pytestmark = pytest.mark.skipif(not DATA.is_dir(), reason=f"shared data folder {DATA} is absent (it sits beside the repo)")

# Small and quick: a low threshold unmasks many tokens per step on a random model.
FAST = ["--protocol", "custom", "--limit", "2", "--batch-size", "2", "--max-new-tokens", "32", "--threshold", "0.05", "--no-warmup"]
SAMPLE_KEYS = {"id", "index", "prediction", "extracted", "gold", "correct", "metrics"}


@pytest.fixture(scope="module")
def checkpoint(eval_checkpoint):
    return eval_checkpoint


SCRIPT_OF_TASK = {"gsm8k": "gsm8k", "math": "math500", "minerva_math": "minerva_math", "ifeval": "ifeval", "mmlu": "mmlu",
                  "gpqa": "gpqa", "arith": "arith"}


def run_script(task: str, argv: list[str], monkeypatch) -> int:
    """Run the task's eval_scripts/<name>.py as __main__ in this process (the file itself, not a copy of it)."""
    script = SCRIPTS / f"{SCRIPT_OF_TASK[task]}.py"
    monkeypatch.setattr(sys, "argv", [str(script), *argv])
    monkeypatch.setattr(sys, "path", list(sys.path))
    with pytest.raises(SystemExit) as exit_info:
        runpy.run_path(str(script), run_name="__main__")
    return exit_info.value.code


def only_run_dir(out: Path, task: str) -> Path:
    dirs = list((out / task).iterdir())
    assert len(dirs) == 1, dirs
    return dirs[0]


def test_the_warm_up_decodes_the_longest_prompts_at_the_batch_size_and_token_budget(checkpoint, tmp_path, monkeypatch):
    """So that the fast path sizes its buffers and compiles before the clock starts: a timed batch
    that grew them would capture and compile again inside the timing."""
    calls = []
    real = runner_module.generate_batch

    def recording(model, tokenizer, prompts, config, budgets=None):
        calls.append((sorted(len(p) for p in prompts), max(budgets) if budgets else config.max_new_tokens))
        return real(model, tokenizer, prompts, config, budgets)

    monkeypatch.setattr(runner_module, "generate_batch", recording)
    argv = ["--model", checkpoint, "--data-files", str(DATA / "gsm8k" / "test.jsonl"), "--output-dir",
            str(tmp_path), "--protocol", "custom", "--limit", "5", "--batch-size", "2", "--max-new-tokens", "40",
            "--threshold", "0.05"]
    assert run_script("gsm8k", argv, monkeypatch) == 0
    (warm_lengths, warm_budget), timed = calls[0], calls[1:]
    assert len(timed) == 3 and sum(len(lengths) for lengths, _ in timed) == 5
    assert warm_lengths == sorted(length for lengths, _ in timed for length in lengths)[-2:]
    assert warm_budget == 40 == max(budget for _, budget in timed)
    summary = json.loads((only_run_dir(tmp_path, "gsm8k") / "summary.json").read_text())
    assert summary["throughput"]["warmup"] == {"batches": 1, "prompts": 2, "max_new_tokens": 40, "counted": False,
                                               "seconds": summary["throughput"]["warmup"]["seconds"]}


def test_gsm8k_script_writes_summary_and_samples(checkpoint, tmp_path, monkeypatch, capsys):
    out = tmp_path / "artifacts"
    argv = ["--model", checkpoint, "--data-files", str(DATA / "gsm8k" / "test.jsonl"), "--output-dir", str(out),
            "--k", "2", "--subset", "first", "--size", "1", *FAST[:-1]]  # warm-up on
    assert run_script("gsm8k", argv, monkeypatch) == 0
    run = only_run_dir(out, "gsm8k")
    assert run.name == "k2_first1_output_custom_t0.05_n32"
    assert str(run / "summary.json") in capsys.readouterr().out
    summary = json.loads((run / "summary.json").read_text())
    assert summary["task"] == "gsm8k" and summary["config"] == run.name
    assert summary["primary_metric"] == "exact_match_flexible" and summary["accuracy"] is not None
    assert set(summary["metrics"]) >= {"exact_match_flexible", "exact_match_strict"}
    tp = summary["throughput"]
    for key in ("tokens", "wall_seconds", "tokens_per_second", "forwards", "tokens_per_forward", "layer_calls_skipped"):
        assert tp[key] is not None, key
    assert tp["layer_calls_skipped"] > 0 and tp["prompts"] == 2
    assert tp["warmup"]["counted"] is False and tp["warmup"]["prompts"] == 2
    assert summary["generation"]["layer_reuse"] == {"k": 2, "subset": "first", "size": 1, "layers": None, "mode": "output",
                                                    "policy": "fixed", "tolerance": None, "max_staleness": None, "layer_k": None,
                                                    "resolved_layers": [1]}
    assert summary["generation"]["fast_path"] == "off (device is cpu, not CUDA)"  # what ran, not the setting
    assert summary["generation"]["fast_path_requested"] == "on"
    env = summary["environment"]
    assert env["torch_threads"] >= 1 and env["cpu_count"] >= 1 and len(env["load_average_before"]) == 3
    assert isinstance(env["busy"], bool)
    assert summary["model"]["num_hidden_layers"] == 2 and summary["model"]["path"] == checkpoint
    assert summary["dataset"]["split"] == "test" and summary["dataset"]["count"] == 2 and summary["dataset"]["total"] == 1319
    assert summary["seed"] == 0 and summary["prompting"]["chat_template"] is True
    env = summary["environment"]
    assert env["device_name"] and env["torch"] and env["transformers"] and env["timestamp"]
    samples = read_jsonl(str(run / "samples.jsonl"))[0]
    assert [s["id"] for s in samples] == ["gsm8k-0", "gsm8k-1"]
    assert all(SAMPLE_KEYS <= set(s) and s["generated_tokens"] > 0 for s in samples)
    assert summary["counts"] == {"samples": 2, "correct": sum(s["correct"] for s in samples)}
    assert sum(s["generated_tokens"] for s in samples) == tp["generated_tokens"]


def _gpqa_csv(path: Path) -> str:
    import csv

    with open(path, "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(["Record ID", "Question", "Correct Answer", "Incorrect Answer 1", "Incorrect Answer 2", "Incorrect Answer 3"])
        w.writerow(["r1", "Which gas do plants absorb?", "Carbon dioxide", "Oxygen", "Helium", "Neon"])
        w.writerow(["r2", "How many legs has a spider?", "Eight", "Six", "Ten", "Four"])
    return str(path)


@pytest.mark.parametrize(
    "task, data, extra, metric",
    [
        ("math", "math500/test.jsonl", [], "math_verify"),
        ("ifeval", "ifeval/input_data.jsonl", [], None),
        ("mmlu", "mmlu", ["--num-fewshot", "5"], "accuracy"),
        ("mmlu", "mmlu", ["--mmlu-mode", "generative"], "acc"),
        ("gpqa", None, ["--k", "3", "--subset", "last", "--size", "1"], "accuracy"),
    ],
    ids=["math", "ifeval", "mmlu-loglikelihood", "mmlu-generative", "gpqa"],
)
def test_task_scripts_end_to_end(task, data, extra, metric, checkpoint, tmp_path, monkeypatch):
    if task == "ifeval":
        pytest.importorskip("if_verifiable", reason="IFEval scoring needs if-verifiable")
    files = _gpqa_csv(tmp_path / "gpqa_main.csv") if task == "gpqa" else str(DATA / data)
    out = tmp_path / "artifacts"
    argv = ["--model", checkpoint, "--data-files", files, "--output-dir", str(out), *FAST, *extra]
    assert run_script(task, argv, monkeypatch) == 0
    run = only_run_dir(out, task)
    summary = json.loads((run / "summary.json").read_text())
    samples = read_jsonl(str(run / "samples.jsonl"))[0]
    assert summary["counts"]["samples"] == len(samples) == 2
    assert all(SAMPLE_KEYS <= set(s) for s in samples)
    if metric:
        assert summary["primary_metric"] == metric
    assert summary["accuracy"] == pytest.approx(summary["metrics"][summary["primary_metric"]])
    tp = summary["throughput"]
    assert tp["tokens"] > 0 and tp["forwards"] > 0 and tp["tokens_per_second"] > 0
    if task == "mmlu" and "--mmlu-mode" not in extra:  # loglikelihood: one forward per pair batch, nothing generated
        assert summary["prompting"]["num_fewshot"] == 5 and summary["dataset"]["fewshot_split"] == "dev"
        assert tp["generated_tokens"] == 0 and tp["token_kind"].startswith("scored")
        assert all(len(s["loglikelihoods"]) == 4 and s["prediction"] in "ABCD" for s in samples)
        assert summary["accuracy"] == sum(s["correct"] for s in samples) / 2
        assert set(summary["metrics"]["accuracy_by_subject"]) == {"abstract_algebra"}
    if task == "gpqa":  # loglikelihood over (A)-(D), as lm-eval's gpqa_main_n_shot
        assert run.name.startswith("k3_last1_output")
        assert all(len(s["loglikelihoods"]) == 4 for s in samples)
        assert {s["gold"] for s in samples} <= set("ABCD")


def test_no_script_shadows_the_standard_library_or_edits_the_import_path():
    scripts = sorted(SCRIPTS.glob("*.py")) + sorted((REPO / "benchmarks").glob("*.py"))
    assert len(scripts) >= 9
    for path in scripts:
        assert path.stem not in sys.stdlib_module_names, path
        assert "sys.path" not in path.read_text(), f"{path} edits sys.path (the package is installed)"
    assert set(SCRIPT_OF_TASK.values()) | {"run_grid", "report"} == {p.stem for p in SCRIPTS.glob("*.py")}


@pytest.mark.slow
@pytest.mark.parametrize("name", ["gsm8k", "math500", "ifeval", "mmlu", "gpqa", "arith", "run_grid", "report"])
def test_each_script_runs_as_a_file(name, tmp_path):
    """`python eval_scripts/<name>.py --help` from any folder, as a separate process."""
    out = subprocess.run([sys.executable, str(SCRIPTS / f"{name}.py"), "--help"], capture_output=True,
                         text=True, timeout=300, cwd=tmp_path, stdin=subprocess.DEVNULL)
    assert out.returncode == 0, out.stderr
    assert ("--data-files" in out.stdout and "--k" in out.stdout) or name == "report"


def test_console_entry_point_runs_every_command(capsys):
    import importlib

    from dllm_generation.eval.cli import COMMANDS, console_main

    tomllib = pytest.importorskip("tomllib")  # Python >= 3.11

    scripts = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["scripts"]
    module, _, func = scripts["dllm-eval"].partition(":")
    assert getattr(importlib.import_module(module), func) is console_main
    for command in COMMANDS:
        with pytest.raises(SystemExit) as exit_info:
            console_main([command, "--help"])
        assert exit_info.value.code == 0
        assert f"usage: dllm-eval {command}" in capsys.readouterr().out
    with pytest.raises(SystemExit) as exit_info:
        console_main(["gsm9k"])
    assert exit_info.value.code == 2 and "invalid choice: 'gsm9k'" in capsys.readouterr().err


def test_unreachable_model_is_a_clear_error(tmp_path, monkeypatch, capsys):
    argv = ["--model", str(tmp_path / "no-model"), "--data-files", str(DATA / "gsm8k" / "test.jsonl"),
            "--output-dir", str(tmp_path / "a"), *FAST]
    assert run_script("gsm8k", argv, monkeypatch) == 1
    err = capsys.readouterr().err
    assert "cannot load model" in err and "no-model" in err and "--model PATH" in err


def _options(checkpoint, out, **changes):
    return EvalOptions(task="gsm8k", protocol="custom", model=checkpoint, limit=4, batch_size=2, max_new_tokens=32, threshold=0.05,
                       warmup=False, output_dir=str(out), data_files=[str(DATA / "gsm8k" / "test.jsonl")]).replace(**changes)


def record_generated_texts(monkeypatch) -> list[str]:
    """The texts every later `generate_batch` call of the eval runner decodes, in order."""
    generated: list[str] = []
    real = runner_module.generate_batch

    def counting(model, tokenizer, prompts, cfg, budgets=None):
        result = real(model, tokenizer, prompts, cfg, budgets)
        generated.extend(result.texts)
        return result

    monkeypatch.setattr(runner_module, "generate_batch", counting)
    return generated


def test_interrupted_run_resumes_without_recomputing_finished_prompts(checkpoint, tmp_path, monkeypatch):
    options = _options(checkpoint, tmp_path)
    first = run_eval(options, progress=False)
    run = Path(options.run_dir())
    samples = (run / "samples.jsonl").read_text().splitlines(keepends=True)
    batches = (run / "batches.jsonl").read_text().splitlines(keepends=True)
    # What a crash during the second batch leaves: no summary, one finished batch, a torn line.
    os.remove(run / "summary.json")
    (run / "samples.jsonl").write_text("".join(samples[:2]) + samples[2][:15])
    (run / "batches.jsonl").write_text(batches[0])

    generated = record_generated_texts(monkeypatch)
    resumed = run_eval(options, progress=False)
    assert len(generated) == 2  # only gsm8k-2 and gsm8k-3
    records = read_jsonl(str(run / "samples.jsonl"))
    assert records[1] == 0 and [r["id"] for r in records[0]] == ["gsm8k-0", "gsm8k-1", "gsm8k-2", "gsm8k-3"]
    assert [r["prediction"] for r in records[0]] == [json.loads(line)["prediction"] for line in samples]
    assert resumed["counts"] == first["counts"] and resumed["metrics"] == first["metrics"]
    assert resumed["throughput"]["batches"] == 2 and resumed["throughput"]["prompts"] == 4

    def no_loading(*_):
        raise AssertionError("a finished run must not load the model")

    again = run_eval(options, loader=no_loading, progress=False)
    assert again["timestamp"] == resumed["timestamp"]
    bigger = run_eval(options.replace(limit=5, batch_size=1), progress=False)  # a larger --limit adds rows only
    assert bigger["counts"]["samples"] == 5 and len(generated) == 3


def test_a_torn_row_is_decoded_again_with_its_whole_batch_and_counted_once(checkpoint, tmp_path, monkeypatch):
    """A batch's counters cover all its rows, so a row torn off a finished batch sends the whole batch
    back: the resumed summary counts every row once, with the counters of an undisturbed run."""
    options = _options(checkpoint, tmp_path)
    first = run_eval(options, progress=False)
    run = Path(options.run_dir())
    samples = (run / "samples.jsonl").read_text().splitlines(keepends=True)
    os.remove(run / "summary.json")
    (run / "samples.jsonl").write_text("".join(samples[:3]) + samples[3][:20])  # the last row torn mid-line

    generated = record_generated_texts(monkeypatch)
    resumed = run_eval(options, progress=False)
    assert len(generated) == 2  # gsm8k-2 and gsm8k-3: the torn row's batch, whole
    for key in ("batches", "prompts", "tokens", "forwards", "layer_calls"):
        assert resumed["throughput"][key] == first["throughput"][key], key
    records = read_jsonl(str(run / "samples.jsonl"))[0]
    assert [r["id"] for r in records] == ["gsm8k-0", "gsm8k-1", "gsm8k-2", "gsm8k-3"]
    assert [r["prediction"] for r in records] == [json.loads(line)["prediction"] for line in samples]


def test_damaged_run_files_are_rebuilt_or_named_never_a_traceback(checkpoint, tmp_path, monkeypatch, capsys):
    """An unreadable summary is rebuilt from the samples; rows whose samples were lost are decoded again
    though a summary says the run is done; an unreadable run.json (the settings) is one line naming it."""
    options = _options(checkpoint, tmp_path)
    first = run_eval(options, progress=False)
    run = Path(options.run_dir())
    (run / "summary.json").write_text("{torn")
    generated = record_generated_texts(monkeypatch)
    rebuilt = run_eval(options, progress=False)
    assert generated == [] and rebuilt["counts"] == first["counts"] and rebuilt["metrics"] == first["metrics"]

    samples = (run / "samples.jsonl").read_text().splitlines(keepends=True)
    (run / "samples.jsonl").write_text("".join(samples[:2]))  # the summary still says 4 rows
    redone = run_eval(options, progress=False)
    assert len(generated) == 2 and redone["counts"] == first["counts"]
    assert [json.loads(line)["prediction"] for line in (run / "samples.jsonl").read_text().splitlines()] == \
        [json.loads(line)["prediction"] for line in samples]

    (run / "run.json").write_text("{torn")
    (run / "summary.json").unlink()
    argv = ["--model", checkpoint, "--data-files", str(DATA / "gsm8k" / "test.jsonl"), "--output-dir", str(tmp_path),
            *FAST[:2], "--limit", "4", "--batch-size", "2", "--max-new-tokens", "32", "--threshold", "0.05", "--no-warmup"]
    assert run_script("gsm8k", argv, monkeypatch) == 1
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip() and "Loading weights" not in line]
    assert len(err) == 1 and "run.json is unreadable" in err[0] and "--force" in err[0], err


def test_report_lists_the_runs_it_cannot_show(checkpoint, tmp_path):
    """An interrupted run, and one whose --force rerun stopped with its earlier results set aside, are
    listed as incomplete instead of vanishing from the report."""
    from dllm_generation.eval.report import build_report

    run_eval(_options(checkpoint, tmp_path, limit=2, run_name="done"), progress=False)
    run_eval(_options(checkpoint, tmp_path, limit=2, run_name="cut"), progress=False)
    run_eval(_options(checkpoint, tmp_path, limit=2, run_name="forced"), progress=False)
    (tmp_path / "gsm8k" / "cut" / "summary.json").unlink()
    forced = tmp_path / "gsm8k" / "forced"
    (forced / ".replaced").mkdir()
    for name in ("summary.json", "samples.jsonl", "batches.jsonl"):
        os.replace(forced / name, forced / ".replaced" / name)
    text = Path(build_report(str(tmp_path), plots=False)).read_text()
    table_rows = [line for line in text.splitlines() if line.startswith("| ") and not line.startswith("| config")]
    assert [row.split(" | ")[0] for row in table_rows] == ["| done"]  # the finished run, alone in the table
    assert "## Incomplete runs" in text
    assert "`gsm8k/cut`: interrupted, 2 row(s) finished" in text
    assert "`gsm8k/forced`: a --force rerun stopped" in text


def test_resume_refuses_results_made_with_other_settings(checkpoint, tmp_path):
    options = _options(checkpoint, tmp_path, limit=2, run_name="same-folder")
    run_eval(options, progress=False)
    copy = tmp_path / "other.jsonl"
    copy.write_text("".join((DATA / "gsm8k" / "test.jsonl").read_text().splitlines(keepends=True)[:2]))

    def no_loading(*_):
        raise AssertionError("the conflict must be found before loading the model")

    with pytest.raises(InvalidOptionError, match="data_files.*--force"):
        run_eval(options.replace(data_files=[str(copy)]), loader=no_loading, progress=False)
    replaced = run_eval(options.replace(data_files=[str(copy)], force=True), progress=False)
    assert replaced["dataset"]["files"] == [str(copy)]
