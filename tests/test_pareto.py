"""benchmarks/plot_reuse_pareto.py: relative executions from summaries, and a plain dominance verdict."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "plot_reuse_pareto.py"


def _load():
    spec = importlib.util.spec_from_file_location("plot_reuse_pareto", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def summary(config, policy, accuracy, calls, n=1000):
    reuse = None if policy == "none" else {"policy": policy}
    return {"config": config, "counts": {"samples": n}, "accuracy": accuracy, "generation": {"layer_reuse": reuse},
            "throughput": {"layer_calls": calls, "tokens_per_second": 1.0}}


def test_an_adaptive_point_with_fewer_executions_and_equal_accuracy_dominates():
    pareto = _load()
    runs = [summary("k1", "none", 0.99, 1000), summary("k2", "fixed", 0.99, 960), summary("k3", "fixed", 0.985, 970),
            summary("drift", "unmask_drift", 0.988, 950)]
    data = pareto.points(runs)
    assert [round(p["relative_executions"], 3) for p in data] == [1.0, 0.96, 0.97, 0.95]
    verdict = pareto.dominance(data)
    assert verdict[0].startswith("drift dominates every fixed point: 95.00 %")


def test_a_miss_is_reported_with_its_size(tmp_path):
    pareto = _load()
    for s in (summary("k1", "none", 0.99, 1000), summary("k2", "fixed", 0.99, 960),
              summary("ks", "per_layer", 0.95, 950)):
        folder = tmp_path / s["config"]
        folder.mkdir()
        (folder / "summary.json").write_text(json.dumps(s))
    verdict = pareto.dominance(pareto.points(pareto.load([str(tmp_path)])))
    assert verdict[0].startswith("no adaptive setting dominates every fixed point; the closest, ks, fails against 2 of 2")
    assert any("vs k2" in line and "points of accuracy below" in line for line in verdict)
