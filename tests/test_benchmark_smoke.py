"""benchmarks/throughput.py: the documented smoke run (`--tiny`) passes, and a failed run fails the script."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "throughput.py"


def _load():
    spec = importlib.util.spec_from_file_location("throughput_bench", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.mark.slow
def test_documented_tiny_run_succeeds_as_a_command(tmp_path):
    """Exactly what docs/benchmarks.md and the script's help run: `python benchmarks/throughput.py --tiny`."""
    out = tmp_path / "r.json"
    proc = subprocess.run([sys.executable, str(SCRIPT), "--tiny", "--json-out", str(out)], capture_output=True,
                          text=True, timeout=900, stdin=subprocess.DEVNULL)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "FAILED" not in proc.stdout
    results = json.loads(out.read_text())
    assert not results["errors"]
    # 2 batch sizes x 2 cache settings x (none, k2-first, k2-last) x 2 paths
    assert len(results["runs"]) == 24
    for r in results["runs"]:
        assert r["tokens_per_second"] > 0 and r["forwards"] > 0 and r["layer_calls"] > 0
        if r["path"] == "eager":
            assert r["token_agreement"] == 1.0  # float32 CPU: the fast path changes no tokens
    plain = {(r["batch"], r["cache"], r["reuse"]): r for r in results["runs"] if r["path"] == "off"}
    for r in results["runs"]:
        twin = plain[(r["batch"], r["cache"], r["reuse"])]
        assert (r["forwards"], r["layer_calls"]) == (twin["forwards"], twin["layer_calls"])
    assert all(r["layer_calls_skipped"] > 0 for r in results["runs"] if r["reuse"] != "none")
    table = proc.stdout.split("\n\n")[-1]
    assert "tok/s" in table and "bound" in table and "agree" in table
    assert table.count("\n") >= 2 + 24
    assert results["environment"]["torch"] == __import__("torch").__version__


def test_tiny_defaults_are_the_small_grid_and_explicit_flags_win():
    bench = _load()
    args = bench.parse_args(["--tiny"])
    assert (args.batch_sizes, args.new_tokens, args.fast_path, args.device) == ("1,3", 40, "eager,off", "cpu")
    assert args.reuse_size is None  # LayerReuseConfig's default share, which fits the 4-layer tiny model
    args = bench.parse_args(["--tiny", "--batch-sizes", "2", "--reuse-size", "0.5"])
    assert args.batch_sizes == "2" and args.reuse_size == 0.5
    full = bench.parse_args(["--device", "cpu"])
    assert (full.batch_sizes, full.new_tokens, full.k) == ("1,8,32", 256, "1,2,3")


def test_a_failed_run_fails_the_script(tmp_path):
    """A reuse size the model cannot hold fails every reuse run: the script must exit non-zero."""
    out = tmp_path / "r.json"
    proc = subprocess.run([sys.executable, str(SCRIPT), "--tiny", "--batch-sizes", "1", "--new-tokens", "8",
                           "--k", "2", "--subsets", "first", "--cache", "on", "--fast-path", "off", "--reuse-size", "12",
                           "--json-out", str(out)], capture_output=True, text=True, timeout=600, stdin=subprocess.DEVNULL)
    assert proc.returncode == 1, proc.stdout[-2000:]
    assert "1 run(s) failed" in proc.stderr
    results = json.loads(out.read_text())
    assert len(results["runs"]) == 1 and len(results["errors"]) == 1  # the baseline ran, the reuse run failed
