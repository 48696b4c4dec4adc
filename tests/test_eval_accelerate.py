"""`accelerate launch` with 2 CPU processes (gloo) gives the same results as one process."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from dllm_generation.eval.artifacts import read_jsonl
from dllm_generation.eval.options import EvalOptions
from dllm_generation.eval.runner import run_eval

pytest.importorskip("accelerate")
REPO = Path(__file__).resolve().parents[1]
DATA = REPO.parent / "shared" / "data"
pytestmark = pytest.mark.skipif(not DATA.is_dir(), reason=f"shared data folder {DATA} is absent (it sits beside the repo)")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_two_processes_match_one(tmp_path):
    from dllm_generation.testing import make_tiny_checkpoint

    ckpt = make_tiny_checkpoint(str(tmp_path / "ckpt"), tokenizer_dir=str(DATA / "qwen2_tokenizer"), num_layers=2)
    task_args = dict(task="gsm8k", protocol="custom", model=ckpt, limit=4, batch_size=2, max_new_tokens=32, threshold=0.05, k=2,
                     size=1, data_files=[str(DATA / "gsm8k" / "test.jsonl")])
    single = run_eval(EvalOptions(**task_args, output_dir=str(tmp_path / "one")), progress=False)

    out = tmp_path / "two"
    cmd = [
        sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
        "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
        "--main_process_port", str(_free_port()),
        str(REPO / "eval_scripts" / "gsm8k.py"), "--model", ckpt, "--protocol", "custom", "--limit", "4", "--batch-size", "2",
        "--max-new-tokens", "32", "--threshold", "0.05", "--k", "2", "--size", "1",
        "--data-files", str(DATA / "gsm8k" / "test.jsonl"), "--output-dir", str(out),
    ]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, env=env, stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert proc.stdout.count("exact_match_flexible=") == 1  # one result line: the main process's

    run = out / "gsm8k" / single["config"]
    double = json.loads((run / "summary.json").read_text())
    assert double["counts"] == single["counts"] and double["metrics"] == single["metrics"]
    assert double["dataset"]["count"] == single["dataset"]["count"] == 4
    assert double["throughput"]["processes"] == 2 and single["throughput"]["processes"] == 1
    for key in ("tokens", "forwards", "layer_calls_skipped", "prompts"):
        assert double["throughput"][key] == single["throughput"][key], key
    assert sorted(os.listdir(run)) == ["batches.jsonl", "run.json", "samples.jsonl", "summary.json"]  # rank files merged
    assert {b["rank"] for b in read_jsonl(str(run / "batches.jsonl"))[0]} == {0, 1}
    one = read_jsonl(str(tmp_path / "one" / "gsm8k" / single["config"] / "samples.jsonl"))[0]
    two = read_jsonl(str(run / "samples.jsonl"))[0]
    assert [(s["id"], s["prediction"]) for s in one] == [(s["id"], s["prediction"]) for s in two]
