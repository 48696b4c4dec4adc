"""benchmarks/throughput.py runs end to end on a tiny CPU config (fast path = its eager form)."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "throughput.py"


def _load():
    spec = importlib.util.spec_from_file_location("throughput_bench", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_throughput_script_tiny_cpu(tmp_path, capsys):
    bench = _load()
    out = tmp_path / "r.json"
    results = bench.main(["--tiny", "--batch-sizes", "1,3", "--new-tokens", "40", "--k", "2", "--subsets", "first,last",
                          "--reuse-size", "2", "--cache", "on,off", "--fast-path", "eager,off", "--warmup", "short",
                          "--json-out", str(out)])
    printed = capsys.readouterr().out
    saved = json.loads(out.read_text())
    assert saved["runs"] == results["runs"] and not results["errors"]
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
    k2 = [r for r in results["runs"] if r["reuse"] != "none"]
    assert all(r["layer_calls_skipped"] > 0 for r in k2)
    table = printed.split("\n\n")[-1]
    assert "tok/s" in table and "bound" in table and "agree" in table
    assert table.count("\n") >= 2 + 24
    assert results["environment"]["torch"] == __import__("torch").__version__
