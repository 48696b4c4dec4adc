"""run_grid.py survives a kill: finished configs are skipped, never recomputed; report.py reads them."""

from __future__ import annotations

import json
import os
import runpy
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
DATA = REPO.parent / "shared" / "data"
pytestmark = pytest.mark.skipif(not DATA.is_dir(), reason=f"shared data folder {DATA} is absent (it sits beside the repo)")

# k=1 is no reuse: the grid runs it once, whatever the subsets.
CELLS = ["k1_first1_output_custom_t0.05_n32", "k2_first1_output_custom_t0.05_n32", "k2_last1_output_custom_t0.05_n32"]


@pytest.fixture(scope="module")
def checkpoint(eval_checkpoint):
    return eval_checkpoint


def grid_command(checkpoint: str, out: Path) -> list[str]:
    return [
        sys.executable, str(REPO / "eval_scripts" / "run_grid.py"), "--task", "gsm8k", "--k", "1,2",
        "--subset", "first,last", "--size", "1", "--model", checkpoint, "--output-dir", str(out),
        "--data-files", str(DATA / "gsm8k" / "test.jsonl"), "--protocol", "custom", "--limit", "2", "--batch-size", "2",
        "--max-new-tokens", "32", "--threshold", "0.05", "--no-warmup",
    ]


@pytest.mark.slow
def test_grid_killed_after_first_config_resumes_without_recomputing(checkpoint, tmp_path):
    out = tmp_path / "artifacts"
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    first = out / "gsm8k" / CELLS[0] / "summary.json"
    proc = subprocess.Popen(grid_command(checkpoint, out), env=env, stdin=subprocess.DEVNULL,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 240
    while not first.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=60)
    assert first.exists(), "the first configuration never finished"
    done_before = {c: (out / "gsm8k" / c / "summary.json") for c in CELLS if (out / "gsm8k" / c / "summary.json").exists()}
    stamps = {c: (p.stat().st_mtime_ns, p.read_bytes()) for c, p in done_before.items()}

    rerun = subprocess.run(grid_command(checkpoint, out), env=env, stdin=subprocess.DEVNULL, capture_output=True,
                           text=True, timeout=300)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    for cell, (mtime, content) in stamps.items():
        path = done_before[cell]
        assert path.stat().st_mtime_ns == mtime and path.read_bytes() == content, f"{cell} was recomputed"
        assert f"skip gsm8k/{cell} (summary exists" in rerun.stdout
    ran = len(CELLS) - len(stamps)
    assert f"[grid] finished: ran {ran}, skipped {len(stamps)}, failed 0" in rerun.stdout
    for cell in CELLS:
        summary = json.loads((out / "gsm8k" / cell / "summary.json").read_text())
        assert summary["counts"]["samples"] == 2 and summary["config"] == cell

    # report.py over the finished grid: a table row per config and one plot for the task.
    argv = [str(REPO / "eval_scripts" / "report.py"), str(out)]
    old_argv, old_path = sys.argv, list(sys.path)
    try:
        sys.argv = argv
        with pytest.raises(SystemExit) as exit_info:
            runpy.run_path(argv[0], run_name="__main__")
    finally:
        sys.argv, sys.path[:] = old_argv, old_path
    assert exit_info.value.code == 0
    text = (out / "results.md").read_text()
    assert all(f"| {cell} |" in text for cell in CELLS)
    k1_row = next(line for line in text.splitlines() if line.startswith(f"| {CELLS[0]} |"))
    assert "x |" in k1_row  # speedup column filled for the baseline too
    assert (out / "plots" / "gsm8k_accuracy_vs_throughput.png").stat().st_size > 1000


def test_grid_force_and_max_runs(checkpoint, tmp_path, capsys):
    from dllm_generation.eval.cli import grid_main

    out = tmp_path / "artifacts"
    argv = grid_command(checkpoint, out)[2:] + ["--max-runs", "1"]
    assert grid_main(argv) == 0
    assert "ran 1, skipped 0, failed 0, not started 2" in capsys.readouterr().out
    mtime = (out / "gsm8k" / CELLS[0] / "summary.json").stat().st_mtime_ns
    assert grid_main(argv + ["--force", "--k", "1", "--subset", "first"]) == 0
    assert "ran 1, skipped 0" in capsys.readouterr().out
    assert (out / "gsm8k" / CELLS[0] / "summary.json").stat().st_mtime_ns != mtime
    with pytest.raises(SystemExit):
        grid_main(argv + ["--k", "1,0"])
    assert "k=0" in capsys.readouterr().err
