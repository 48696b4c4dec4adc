"""What a run may do to a results folder, and how bad input ends: one line, exit code, nothing half-written.

Finished results survive every failure: a model that does not load, --force with a typo, a crash
or Ctrl-C before the replacement's first result. Bad settings and bad data stop the run before
the model loads and before the folder changes.
"""

from __future__ import annotations

import json
import os
import re
import tempfile
import signal
import sys
from pathlib import Path

import pytest

from dllm_generation.eval import artifacts
from dllm_generation.eval import runner as runner_module
from dllm_generation.eval.cli import INTERRUPTED, grid_main, main
from dllm_generation.eval.options import EvalOptions

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"
pytestmark = pytest.mark.skipif(not DATA.is_dir(), reason=f"shared data folder {DATA} is absent (it sits beside the repo)")
GSM8K = str(DATA / "gsm8k" / "test.jsonl")
# --protocol custom: these runs change protocol-governed settings (batch size, threshold).
QUICK = ["--protocol", "custom", "--batch-size", "2", "--max-new-tokens", "32", "--threshold", "0.05", "--no-warmup"]


def gsm8k_args(model: str, out: Path, *extra: str, limit: int = 2) -> list[str]:
    return ["--model", model, "--data-files", GSM8K, "--output-dir", str(out), "--limit", str(limit), *QUICK, *extra]


def snapshot(folder: Path) -> dict[str, bytes]:
    """Every file under `folder` (hidden ones included) and its bytes."""
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


PROGRESS = re.compile(r"\d+%\|")  # tqdm progress bars (model loading, prompts)


def only_line(text: str) -> str:
    """The one line a failure printed, among log records and progress bars."""
    lines = [line for line in re.split(r"[\r\n]", text)
             if line.strip() and " INFO " not in line and " WARNING " not in line and not PROGRESS.search(line)]
    assert len(lines) == 1, text
    assert "Traceback" not in text
    return lines[0]


def no_model_loading(monkeypatch):
    import dllm_generation

    def refuse(*args, **kwargs):
        raise AssertionError("the model must not be loaded")

    monkeypatch.setattr(dllm_generation, "load_model", refuse)


@pytest.fixture()
def finished_run(eval_checkpoint, tmp_path):
    """A finished 4-row GSM8K run (two batches) and its folder."""
    out = tmp_path / "artifacts"
    assert main("gsm8k", gsm8k_args(eval_checkpoint, out, limit=4)) == 0
    run = next((out / "gsm8k").iterdir())
    assert (run / "summary.json").exists()
    return out, run


# ---------------------------------------------------------------------------- data safety
def test_force_with_a_model_that_does_not_load_deletes_nothing(finished_run, tmp_path, capsys):
    out, run = finished_run
    before = snapshot(run)
    capsys.readouterr()
    assert main("gsm8k", gsm8k_args(str(tmp_path / "typo"), out, "--force", "--run-name", run.name, limit=4)) == 1
    assert only_line(capsys.readouterr().err).startswith("error: cannot load model")
    assert snapshot(run) == before


@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="needs a machine without CUDA")
def test_force_on_a_device_the_machine_lacks_deletes_nothing(finished_run, eval_checkpoint, capsys, monkeypatch):
    out, run = finished_run
    before = snapshot(run)
    capsys.readouterr()
    no_model_loading(monkeypatch)
    code = main("gsm8k", gsm8k_args(eval_checkpoint, out, "--device", "cuda", "--force", limit=4))
    assert code == 1
    line = only_line(capsys.readouterr().err)
    assert line.startswith("error: device='cuda' is not available")
    assert snapshot(run) == before


@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="needs a machine without CUDA")
@pytest.mark.parametrize("fast_path", ["graphs", "compile"])
def test_a_cuda_only_fast_path_on_the_cpu_is_refused_before_anything_is_touched(finished_run, eval_checkpoint, capsys,
                                                                                monkeypatch, fast_path):
    out, run = finished_run
    before = snapshot(run)
    capsys.readouterr()
    no_model_loading(monkeypatch)
    code = main("gsm8k", gsm8k_args(eval_checkpoint, out, "--fast-path", fast_path, "--force", limit=4))
    assert code == 1
    line = only_line(capsys.readouterr().err)
    assert line == f"error: fast_path={fast_path!r} needs a CUDA device (this run's device is 'cpu'; allowed here: on, off)"
    assert snapshot(run) == before


def test_force_sets_old_results_aside_until_the_first_new_result(finished_run, eval_checkpoint, monkeypatch):
    out, run = finished_run
    before = snapshot(run)
    real = runner_module.generate_batch
    calls = []

    def crash_before_first_result(*args, **kwargs):
        calls.append(1)
        assert (run / ".replaced" / "summary.json").exists()  # set aside, not deleted, while decoding
        raise RuntimeError("out of memory")

    monkeypatch.setattr(runner_module, "generate_batch", crash_before_first_result)
    options = EvalOptions(task="gsm8k", protocol="custom", model=eval_checkpoint, data_files=[GSM8K],
                          output_dir=str(out), limit=4, batch_size=2, max_new_tokens=32, threshold=0.05, warmup=False, force=True)
    with pytest.raises(RuntimeError, match="out of memory"):
        runner_module.run_eval(options, progress=False)
    assert calls and snapshot(run) == before  # nothing written yet: the old results are back

    def crash_after_first_result(*args, **kwargs):
        calls.append(2)
        if calls.count(2) == 2:
            raise RuntimeError("out of memory")
        return real(*args, **kwargs)

    monkeypatch.setattr(runner_module, "generate_batch", crash_after_first_result)
    with pytest.raises(RuntimeError):
        runner_module.run_eval(options, progress=False)
    assert not (run / ".replaced").exists() and not (run / "summary.json").exists()
    assert len(artifacts.read_jsonl(str(run / "samples.jsonl"))[0]) == 2  # the new run's first batch only


def test_a_replacement_killed_before_its_first_result_is_undone_on_the_next_start(finished_run, eval_checkpoint):
    out, run = finished_run
    before = snapshot(run)
    files = artifacts.RunFiles(str(run))
    files.begin({"model": "new"}, replace=True)  # what a killed --force run leaves: old files aside
    assert not files.has_results() and (run / ".replaced").is_dir()
    assert main("gsm8k", gsm8k_args(eval_checkpoint, out, limit=4)) == 0  # the same command, without --force
    assert snapshot(run) == before


def test_a_failed_model_load_does_not_lock_the_folder(eval_checkpoint, tmp_path, capsys):
    out = tmp_path / "artifacts"
    assert main("gsm8k", gsm8k_args(str(tmp_path / "typo"), out, "--run-name", "r")) == 1
    assert not (out / "gsm8k" / "r").exists() or not any((out / "gsm8k" / "r").iterdir())
    # A folder holding only a run.json (no results) never refuses a rerun either.
    artifacts.write_json_atomic(str(out / "gsm8k" / "r" / "run.json"), {"model": "something else"})
    capsys.readouterr()
    assert main("gsm8k", gsm8k_args(eval_checkpoint, out, "--run-name", "r")) == 0
    stored = json.loads((out / "gsm8k" / "r" / "run.json").read_text())
    assert stored["model"] == os.path.abspath(eval_checkpoint)


def test_grid_with_a_model_that_does_not_load_leaves_no_run_json(eval_checkpoint, tmp_path, capsys):
    out = tmp_path / "artifacts"
    argv = ["--task", "gsm8k", "--k", "1,2", "--subset", "first", "--size", "1", "--data-files", GSM8K,
            "--output-dir", str(out), "--limit", "2", *QUICK]
    assert grid_main(argv + ["--model", str(tmp_path / "typo")]) == 1
    assert only_line(capsys.readouterr().err).startswith("error: cannot load model")
    assert not list(out.rglob("run.json"))
    assert grid_main(argv + ["--model", eval_checkpoint]) == 0
    assert "ran 2, skipped 0, failed 0" in capsys.readouterr().out


def test_grid_extends_finished_cells_to_a_larger_limit(eval_checkpoint, tmp_path, capsys, monkeypatch):
    out = tmp_path / "artifacts"
    argv = ["--task", "gsm8k", "--k", "1,2", "--subset", "first", "--size", "1", "--data-files", GSM8K,
            "--output-dir", str(out), "--model", eval_checkpoint, *QUICK]
    assert grid_main(argv + ["--limit", "2"]) == 0
    assert "ran 2, skipped 0" in capsys.readouterr().out
    decoded = []
    real = runner_module.generate_batch

    def counting(model, tokenizer, prompts, cfg, budgets=None):
        decoded.append(len(prompts))
        return real(model, tokenizer, prompts, cfg, budgets)

    monkeypatch.setattr(runner_module, "generate_batch", counting)
    assert grid_main(argv + ["--limit", "3"]) == 0
    assert "ran 2, skipped 0" in capsys.readouterr().out
    assert decoded == [1, 1]  # one new row per cell, the finished ones kept
    for cell in (out / "gsm8k").iterdir():
        assert json.loads((cell / "summary.json").read_text())["counts"]["samples"] == 3
    assert grid_main(argv + ["--limit", "3"]) == 0
    assert "ran 0, skipped 2" in capsys.readouterr().out


def test_a_smaller_limit_reports_fewer_rows_and_keeps_every_finished_one(finished_run, eval_checkpoint):
    out, run = finished_run
    summary = runner_module.run_eval(EvalOptions(task="gsm8k", protocol="custom", model=eval_checkpoint, data_files=[GSM8K],
                                                 output_dir=str(out), limit=2, batch_size=2, max_new_tokens=32,
                                                 threshold=0.05, warmup=False), progress=False)
    assert summary["counts"]["samples"] == 2 and summary["throughput"]["prompts"] == 2
    assert len(artifacts.read_jsonl(str(run / "samples.jsonl"))[0]) == 4


def test_a_data_folder_uses_its_test_split_not_the_training_rows(eval_checkpoint, tmp_path):
    from dllm_generation.eval.data import DataUnavailableError, load_task_data

    data = load_task_data(EvalOptions(task="gsm8k", data_files=[str(DATA / "gsm8k")]))
    assert data.source["total"] == 1319 and data.source["split"] == "test"
    assert data.source["files"] == [os.path.abspath(GSM8K)]
    train = load_task_data(EvalOptions(task="gsm8k", split="train", data_files=[str(DATA / "gsm8k")], limit=1))
    assert train.source["total"] == 7473
    folder = tmp_path / "mixed"
    folder.mkdir()
    for name in ("part_a.jsonl", "part_b.jsonl"):
        (folder / name).write_text(Path(GSM8K).read_text().split("\n", 1)[0] + "\n")
    with pytest.raises(DataUnavailableError, match=r"holds several data files \(part_a.jsonl, part_b.jsonl\) and none "
                                                   r"is named for the 'test' split"):
        load_task_data(EvalOptions(task="gsm8k", data_files=[str(folder)]))
    # An MMLU folder with test and dev CSVs side by side evaluates the test rows only.
    flat = tmp_path / "mmlu_flat"
    flat.mkdir()
    for split in ("test", "dev"):
        src = DATA / "mmlu" / split / f"anatomy_{split}.csv"
        (flat / src.name).write_bytes(src.read_bytes())
    mmlu = load_task_data(EvalOptions(task="mmlu", data_files=[str(flat)], num_fewshot=0))
    assert mmlu.source["total"] == 135 and all(f.endswith("anatomy_test.csv") for f in mmlu.source["files"])


# ---------------------------------------------------------------------------- errors, not tracebacks
def test_default_reuse_size_fits_a_shallow_model_and_a_too_large_one_is_refused_first(
        eval_checkpoint, tmp_path, capsys, monkeypatch):
    out = tmp_path / "artifacts"
    assert main("gsm8k", gsm8k_args(eval_checkpoint, out, "--k", "2")) == 0  # default size: a share, 1 of 2 layers
    summary = json.loads(next((out / "gsm8k").glob("k2_first0.429_output*/summary.json")).read_text())
    assert summary["generation"]["layer_reuse"]["resolved_layers"] == [1]
    assert summary["throughput"]["layer_calls_skipped"] > 0
    capsys.readouterr()
    no_model_loading(monkeypatch)
    assert main("gsm8k", gsm8k_args(eval_checkpoint, out, "--k", "2", "--size", "12")) == 1
    line = only_line(capsys.readouterr().err)
    assert "size=12 is too large for a model of 2 layers" in line and "--size" in line
    assert not (out / "gsm8k" / "k2_first12_output_custom_t0.05_n32").exists()


@pytest.mark.parametrize("where", ["inside a file", "unwritable"])
def test_an_output_dir_that_cannot_hold_results_is_refused_before_anything(where, eval_checkpoint, tmp_path, capsys,
                                                                         monkeypatch):
    if where == "inside a file":
        (tmp_path / "file").write_text("x")
        out = tmp_path / "file" / "artifacts"
    else:
        locked = tmp_path / "locked"
        locked.mkdir()
        locked.chmod(0o500)
        out = locked / "artifacts"
        if _writable(locked):  # a privileged user writes anyway: use a read-only system folder
            out = Path("/sys/dllm-generation-test")
            if not Path("/sys").is_dir() or _writable(Path("/sys")):
                pytest.skip("no unwritable folder on this machine")
    no_model_loading(monkeypatch)
    with pytest.raises(SystemExit) as exit_info:
        main("gsm8k", gsm8k_args(eval_checkpoint, out))
    assert exit_info.value.code == 2
    err = only_line(capsys.readouterr().err)
    assert err.startswith(f"{Path(sys.argv[0]).name}: error: output_dir='{out}'")
    assert ("is a file" in err) if where == "inside a file" else ("is not writable" in err)
    assert not out.exists()


def _writable(folder: Path) -> bool:
    try:
        with tempfile.TemporaryFile(dir=folder):
            return True
    except OSError:
        return False


def test_another_tasks_data_is_refused_before_the_model_loads(eval_checkpoint, tmp_path, capsys, monkeypatch):
    no_model_loading(monkeypatch)
    out = tmp_path / "artifacts"
    argv = ["--model", eval_checkpoint, "--data-files", str(DATA / "math500" / "test.jsonl"), "--output-dir", str(out),
            *QUICK]
    assert main("gsm8k", argv) == 1
    line = only_line(capsys.readouterr().err)
    assert "line 1 has no field 'question'" in line and "gsm8k rows need question, answer" in line
    assert not out.exists()


def test_a_malformed_jsonl_line_is_reported_by_its_line_number(eval_checkpoint, tmp_path, capsys, monkeypatch):
    lines = Path(GSM8K).read_text().splitlines(keepends=True)[:5]
    broken = tmp_path / "test.jsonl"
    broken.write_text(lines[0] + "\n" + lines[1] + lines[2][:30] + "\n" + lines[3])  # line 2 blank, line 4 torn
    no_model_loading(monkeypatch)
    out = tmp_path / "artifacts"
    argv = ["--model", eval_checkpoint, "--data-files", str(broken), "--output-dir", str(out), *QUICK]
    assert main("gsm8k", argv) == 1
    line = only_line(capsys.readouterr().err)
    assert f"{broken}': line 4 is not valid JSON" in line
    assert not out.exists()


def test_a_tokenizer_larger_than_the_model_vocabulary_is_refused_before_decoding(tiny_path, tmp_path, capsys):
    argv = ["--model", tiny_path, "--tokenizer", str(DATA / "qwen2_tokenizer"), "--data-files", GSM8K,
            "--output-dir", str(tmp_path / "artifacts"), "--limit", "1", *QUICK]
    assert main("gsm8k", argv) == 1
    line = only_line(capsys.readouterr().err)
    assert "but model" in line and "embeds only ids 0..511" in line and "--tokenizer" in line
    assert not list((tmp_path / "artifacts").rglob("run.json"))


def test_ctrl_c_prints_one_line_and_the_same_command_resumes(eval_checkpoint, tmp_path, capsys, monkeypatch):
    out = tmp_path / "artifacts"
    argv = gsm8k_args(eval_checkpoint, out, limit=4)
    real = runner_module.generate_batch
    calls = []

    def interrupted_second_batch(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(runner_module, "generate_batch", interrupted_second_batch)
    assert main("gsm8k", argv) == 130
    assert only_line(capsys.readouterr().err) == INTERRUPTED
    run = next((out / "gsm8k").iterdir())
    assert len(artifacts.read_jsonl(str(run / "samples.jsonl"))[0]) == 2 and not (run / "summary.json").exists()
    calls.clear()
    monkeypatch.setattr(runner_module, "generate_batch", lambda *a, **k: (calls.append(1), real(*a, **k))[1])
    assert main("gsm8k", argv) == 0
    assert len(calls) == 1  # only the interrupted batch is decoded again
    assert json.loads((run / "summary.json").read_text())["counts"]["samples"] == 4


def test_ctrl_c_during_a_write_is_delivered_after_both_records_are_on_disk(tmp_path):
    files = artifacts.RunFiles(str(tmp_path))
    real = artifacts.append_jsonl
    writes = []

    def append_then_signal(path, records):
        real(path, records)
        writes.append(path)
        if len(writes) == 1:
            os.kill(os.getpid(), signal.SIGINT)  # Ctrl-C between the samples and the counters

    artifacts.append_jsonl = append_then_signal
    # A process started in the background inherits SIGINT ignored; a terminal's Ctrl-C finds Python's handler.
    inherited = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        with pytest.raises(KeyboardInterrupt):
            files.append([{"id": "a", "index": 0}], {"rank": 0})
    finally:
        artifacts.append_jsonl = real
        after = signal.signal(signal.SIGINT, inherited)
    assert len(writes) == 2 and files.batch_records() == [{"rank": 0}]
    assert after is signal.default_int_handler  # the handler in force before the write is back


def test_cli_error_lines_are_single_lines(capsys):
    from dllm_generation.eval.cli import _error

    assert _error(ValueError("first\nsecond   third")) == 1
    assert capsys.readouterr().err == "error: first second third\n"
