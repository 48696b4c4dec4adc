"""benchmarks/pass_timing.py: the CPU smoke run measures every kind of matrix product and an uncaptured
decode, writes its JSON, and bad arguments stop it with one line before any model is built."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "pass_timing.py"


def run(*argv, timeout=300):
    return subprocess.run([sys.executable, str(SCRIPT), *argv], capture_output=True, text=True, timeout=timeout,
                          stdin=subprocess.DEVNULL)


def test_tiny_run_times_every_kind_of_product_and_an_uncaptured_decode(tmp_path):
    out = tmp_path / "passes.json"
    proc = run("--tiny", "--tokens", "8,16", "--new-tokens", "40", "--json-out", str(out))
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    results = json.loads(out.read_text())
    assert set(results["matrix_products"]) == {"default tokens=8", "default tokens=16"}
    for products in results["matrix_products"].values():
        assert set(products) == {"q", "k", "v", "o", "gate", "up", "down", "head", "all", "gate_up"}  # no kernel on the CPU
        assert all(v["ms"] > 0 and v["bytes"] > 0 for v in products.values())
        assert products["all"]["bytes"] == sum(v["bytes"] for k, v in products.items() if k not in ("all", "gate_up"))
        assert products["gate_up"]["bytes"] == products["gate"]["bytes"] + products["up"]["bytes"]
    decode = results["modes"]["uncaptured"]
    assert decode["engine"]["mode"] == "uncaptured" and decode["engine"]["uncaptured_passes"] > 0
    assert len(decode["ms_per_forward"]) == 3 and all(ms > 0 for ms in decode["ms_per_forward"])
    assert results["environment"]["weights_floor"]["ms"] > 0
    assert not list(tmp_path.glob("*.tmp"))


@pytest.mark.parametrize("argv, message", [
    (["--modes", "graphs"], "--modes graphs captures CUDA graphs and needs --device cuda"),
    (["--modes", "fast"], "--modes takes a comma list of ['graphs', 'compile', 'compile-static', 'compile-autotune']"),
    (["--tokens", "8,0"], "--tokens takes a comma list of positive integers"),
    (["--blas", "cublas"], "--blas chooses a CUDA BLAS library and needs --device cuda"),
    (["--replays", "0"], "--replays must be a positive integer, got 0"),
    (["--dtype", "int8"], "--dtype must be one of ['bfloat16', 'float16', 'float32'], got 'int8'"),
])
def test_bad_arguments_stop_with_one_line(argv, message):
    proc = run("--tiny", *argv, timeout=60)
    assert proc.returncode == 2
    assert message in proc.stderr and len(proc.stderr.strip().splitlines()) == 1
    assert "Traceback" not in proc.stderr
