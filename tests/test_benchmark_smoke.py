"""benchmarks/throughput.py: the documented smoke run (`--tiny`) passes, a failed run fails the script, the
floor / autoregressive / target-workload / reference measurements are present, and bad arguments stop it
with one line before any model is built."""

from __future__ import annotations

import importlib.util
import json
import math
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
import torch

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "throughput.py"
# The grid the GPU measurements are run with; docs/benchmarks.md adds a time budget.
GPU_COMMAND = ("--config fast_dllm_v2_7b/config.json --batch-sizes 1,32 --cache on --fast-path on,graphs,off "
               "--plain-grid baseline --workload both --k 1,2 --subsets first "
               "--json-out r.json").split()


def _load():
    spec = importlib.util.spec_from_file_location("throughput_bench", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture(scope="module")
def bench():
    return _load()


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
        assert r["workload"] == "random" and r["full_length"]
        assert r["tokens_per_second"] > 0 and r["forwards"] > 0 and r["layer_calls"] > 0
        if r["path"] == "uncaptured":
            assert r["token_agreement"] == 1.0  # float32 CPU: the fast path changes no tokens
    plain = {(r["batch"], r["cache"], r["reuse"]): r for r in results["runs"] if r["path"] == "off"}
    for r in results["runs"]:
        twin = plain[(r["batch"], r["cache"], r["reuse"])]
        assert (r["forwards"], r["layer_calls"]) == (twin["forwards"], twin["layer_calls"])
    assert all(r["layer_calls_skipped"] > 0 for r in results["runs"] if r["reuse"] != "none")
    floor = results["environment"]["weights_floor"]
    assert floor["ms"] > 0 and floor["gb_per_second"] > 0 and floor["bytes"] > 0
    ar = results["autoregressive"]
    assert [(a["batch"], a["path"], a["generated_tokens"]) for a in ar] == [(1, "ar-eager", 40), (3, "ar-eager", 120)]
    table = proc.stdout.split("\n\n")[-1]
    assert "tok/s" in table and "bound" in table and "agree" in table and "xfloor" in table and "vs AR" in table
    assert table.count("\n") >= 2 + 24 + 2 and table.count("ar-eager") == 2
    assert results["environment"]["torch"] == __import__("torch").__version__


def test_target_workload_reuse_policies_and_reference_in_one_run(bench, tmp_path, capsys):
    """--workload target: alpha > 1 brings batch-1 tokens/forward to the target (+-10%), no row stops early;
    the drift policy's cells, the floor, the AR row and the reference ratio are all in the one table."""
    ref = tmp_path / "ref.json"
    ref.write_text(json.dumps({"environment": {"note": "made up for the test"},
                               "runs": [{"batch": 1, "cache": "on", "tokens_per_second": 50.0}]}))
    out = tmp_path / "r.json"
    results = bench.main(["--tiny", "--workload", "target", "--target-tpf", "2", "--batch-sizes", "1", "--cache", "on",
                          "--k", "2", "--subsets", "first", "--policy", "fixed,unmask_drift", "--tolerance", "0.25",
                          "--fast-path", "uncaptured,off", "--reference-json", str(ref), "--json-out", str(out)])
    assert not bench.failures(results), results["errors"]
    assert json.loads(out.read_text())["workload"] == results["workload"]
    cal = results["workload"]
    assert cal["alpha"] > 1 and abs(cal["tokens_per_forward"] - 2) <= 0.1 * 2 and cal["full_length"]
    assert cal["stop_ids_excluded"] == [510]  # the tiny model's eos id
    runs = {(r["reuse"], r["path"]): r for r in results["runs"]}
    assert set(runs) == {(c, p) for c in ("none", "k2-first", "drift0.25-first") for p in ("uncaptured", "off")}
    assert all(r["workload"] == "target" and r["full_length"] for r in runs.values())
    # The timed runs decode at alpha: with the weights as built this model takes ~0.77 tokens per forward.
    assert runs[("none", "off")]["tokens_per_forward"] > 1.5
    assert all(r["token_agreement"] == 1.0 for (_, p), r in runs.items() if p == "uncaptured")
    assert [(a["batch"], a["generated_tokens"]) for a in results["autoregressive"]] == [(1, 40)]
    assert results["environment"]["weights_floor"]["ms"] > 0

    table = capsys.readouterr().out.split("\n\n")[-1]
    header = next(line for line in table.splitlines() if line.startswith("workload"))
    for column in ("xfloor", "of bound", "vs AR", "vs ref", "tok/fwd"):
        assert column in header
    none_eager = runs[("none", "uncaptured")]
    row = next(line for line in table.splitlines() if " none " in line and " uncaptured " in line)
    assert f"{none_eager['tokens_per_second'] / 50.0:.2f}x" in row  # vs ref
    drift = runs[("drift0.25-first", "uncaptured")]
    bound = none_eager["layer_calls"] / drift["layer_calls"]
    speedup = drift["tokens_per_second"] / none_eager["tokens_per_second"]
    drift_row = next(line for line in table.splitlines() if "drift0.25-first" in line and " uncaptured " in line)
    assert f"{bound:.3f}" in drift_row and f"{100 * speedup / bound:.0f}%" in drift_row


def _documented_two_workload_command() -> list[str]:
    doc = (SCRIPT.parents[1] / "docs" / "benchmarks.md").read_text(encoding="utf-8")
    joined = doc.replace("\\\n", " ").splitlines()
    # The command under the "Both workloads, the floor and the autoregressive baseline" comment.
    at = next(i for i, ln in enumerate(joined) if ln.startswith("# Both workloads, the floor and the autoregressive"))
    line = next(ln for ln in joined[at:] if ln.startswith("python benchmarks/throughput.py"))
    return shlex.split(line)[2:]


@pytest.mark.parametrize("argv", [GPU_COMMAND, _documented_two_workload_command()], ids=["grid", "docs"])
def test_the_gpu_command_parses_to_the_intended_grid(bench, argv):
    args = bench.parse_args(argv)
    assert [label for label, _ in args.reuse_grid] == ["none", "k1-first", "k2-first"]
    assert (args.workload, args.ar, args.fast_path, args.plain_grid) == ("both", "static", "on,graphs,off", "baseline")
    assert args.target_tpf == 2.5 and not args.no_floor and args.reference is None


@pytest.mark.parametrize("argv, option", [
    (["--workload", "realistic"], "--workload"),
    (["--policy", "adaptive"], "--policy"),
    (["--policy", "unmask_drift", "--tolerance", "-0.25"], "--tolerance"),
    (["--policy", "unmask_drift"], "--tolerance"),
    (["--tolerance", "0.5"], "--tolerance"),
    (["--policy", "unmask_drift", "--tolerance", "0.5", "--max-staleness", "0"], "--max-staleness"),
    (["--target-tpf", "0.5"], "--target-tpf"),
    (["--cache", "maybe"], "--cache"),
    (["--ar", "compiled"], "--ar"),
    (["--batch-sizes", "1,x"], "--batch-sizes"),
    (["--profile", "on", "--profile-batch", "0"], "--profile-batch"),
    (["--reference-json", "/nonexistent/ref.json"], "--reference-json"),
])
def test_bad_arguments_end_with_one_line_and_exit_2_before_any_model(bench, monkeypatch, capsys, argv, option):
    monkeypatch.setattr(bench, "build_model", lambda *a, **k: pytest.fail("a model was built"))
    with pytest.raises(SystemExit) as stop:
        bench.main(["--tiny", *argv])
    assert stop.value.code == 2
    captured = capsys.readouterr()
    assert captured.out == "" and captured.err.count("\n") == 1 and option in captured.err, captured.err


@pytest.mark.parametrize("run, field", [
    ({"batch": 1, "cache": "yes", "tokens_per_second": 3.0}, "cache"),
    ({"batch": 0, "cache": "on", "tokens_per_second": 3.0}, "batch"),
    ({"batch": 1, "cache": "on", "tokens_per_second": -3.0}, "tokens_per_second"),
    ({"batch": 1, "cache": "on", "tokens_per_second": 3.0, "workload": "real"}, "workload"),
])
def test_a_bad_reference_file_names_the_field(bench, tmp_path, capsys, run, field):
    ref = tmp_path / "ref.json"
    ref.write_text(json.dumps({"runs": [run]}))
    with pytest.raises(SystemExit) as stop:
        bench.parse_args(["--tiny", "--reference-json", str(ref)])
    assert stop.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"runs[0].{field}" in err


def test_bad_workload_on_the_command_line_exits_2_with_one_line():
    proc = subprocess.run([sys.executable, str(SCRIPT), "--tiny", "--workload", "realistic"], capture_output=True,
                          text=True, timeout=300, stdin=subprocess.DEVNULL)
    assert proc.returncode == 2
    assert proc.stdout == ""  # nothing ran: the environment line is printed before the model is built
    assert proc.stderr.count("\n") == 1 and "--workload" in proc.stderr and "'both'" in proc.stderr


def test_reference_lookup_prefers_the_same_workload(bench):
    reference_tokens_per_second = bench.reference_sampler.reference_tokens_per_second

    ref = {"runs": [{"batch": 1, "cache": "on", "tokens_per_second": 30.0},
                    {"batch": 1, "cache": "on", "tokens_per_second": 70.0, "workload": "target"},
                    {"batch": 8, "cache": "off", "tokens_per_second": 200.0}]}
    assert reference_tokens_per_second(ref, 1, True, "target") == 70.0
    assert reference_tokens_per_second(ref, 1, True, "random") == 30.0
    assert reference_tokens_per_second(ref, 8, True, "random") is None
    assert reference_tokens_per_second(None, 1, True, "random") is None


def test_calibration_bisects_to_the_target_and_reports_a_miss(bench):
    calibrate_alpha = bench.workload.calibrate_alpha

    quiet = dict(log=lambda line: None)
    smooth = calibrate_alpha(lambda a: 0.8 + 0.5 * math.log(a), 2.5, **quiet)
    assert smooth.within_tolerance and smooth.alpha > 1 and len(smooth.probes) <= 14
    assert abs(0.8 + 0.5 * math.log(smooth.alpha) - smooth.tokens_per_forward) < 1e-12  # the value measured there
    step = calibrate_alpha(lambda a: 1.0 if a < 10 else 6.0, 2.5, **quiet)
    assert not step.within_tolerance  # the script then runs no target rows and exits 1


def _tiny_model(bench, *extra):
    args = bench.parse_args(["--tiny", "--prompt-min", "5", "--prompt-max", "9", *extra])
    return bench.build_model(bench.load_hub_config(args), args), args


def test_workload_weights_scale_the_logits_and_restore_and_stop_ids_are_never_chosen(bench):
    Workload, WorkloadWeights = bench.workload.Workload, bench.workload.WorkloadWeights

    model, args = _tiny_model(bench)
    eos = model.generation_config.eos_token_id
    ids = torch.tensor([[3, 17, 42, 99]])
    with torch.no_grad():
        before = model(input_ids=ids).logits
    assert torch.all(before[..., eos] == 0) and torch.all(before.amax(-1) > 0)  # a stop token is never the argmax
    norm0 = model.model.norm.weight.clone()
    weights = WorkloadWeights(model)
    weights.set(Workload.TARGET, 8.0)
    with torch.no_grad():
        scaled = model(input_ids=ids).logits
    torch.testing.assert_close(scaled, 8.0 * before, rtol=1e-5, atol=1e-5)  # same argmax, peaked softmax
    weights.set(Workload.RANDOM)
    assert torch.equal(model.model.norm.weight, norm0)


def test_weight_bytes_count_a_tied_weight_once(bench):
    weight_bytes, weights_stream_floor = bench.baselines.weight_bytes, bench.baselines.weights_stream_floor

    model = torch.nn.Module()
    model.embed = torch.nn.Embedding(10, 4)
    model.head = torch.nn.Linear(4, 10, bias=False)
    model.head.weight = model.embed.weight
    model.norm = torch.nn.Parameter(torch.ones(4))
    assert weight_bytes(model) == (10 * 4 + 4) * 4
    floor = weights_stream_floor(model, repeats=2, warmup=1)
    assert floor["bytes"] == 176 and floor["ms"] > 0 and set(floor["ms_by_reduction"]) == {"sum", "amax"}


@pytest.mark.parametrize("mode", ["eager", "static"])
def test_autoregressive_baseline_is_greedy_token_by_token_with_left_padding(bench, mode):
    """transformers' generate on the block-diffusion model class: each left-padded row gets exactly the
    tokens a cache-free greedy loop gives that prompt alone (stop tokens excluded, as min_new_tokens does)."""
    ArMode, autoregressive_generate = bench.baselines.ArMode, bench.baselines.autoregressive_generate

    model, args = _tiny_model(bench)
    ids, mask = bench.make_prompts(args, 3, 500)
    assert len(set(mask.sum(1).tolist())) > 1  # mixed lengths: left padding is exercised
    new, _ = autoregressive_generate(model, ids, mask, 6, ArMode(mode))
    eos = model.generation_config.eos_token_id
    for row in range(3):
        seq = ids[row][mask[row].bool()][None]
        with torch.no_grad():
            for _ in range(6):
                logits = model(input_ids=seq).logits[:, -1]
                logits[:, eos] = -math.inf
                seq = torch.cat([seq, logits.argmax(-1, keepdim=True)], dim=1)
        assert new[row].tolist() == seq[0, -6:].tolist()


def test_tiny_defaults_are_the_small_grid_and_explicit_flags_win():
    bench = _load()
    args = bench.parse_args(["--tiny"])
    assert (args.batch_sizes, args.new_tokens, args.fast_path, args.device) == ("1,3", 40, "uncaptured,off", "cpu")
    assert args.reuse_size is None  # LayerReuseConfig's default share, which fits the 4-layer tiny model
    assert (args.ar, args.workload) == ("eager", "random")
    assert args.init_std == pytest.approx(0.02 * math.sqrt(3584 / 64))  # the 7B's per-element scale
    args = bench.parse_args(["--tiny", "--batch-sizes", "2", "--reuse-size", "0.5", "--init-std", "0.02"])
    assert args.batch_sizes == "2" and args.reuse_size == 0.5 and args.init_std == 0.02
    full = bench.parse_args(["--device", "cpu"])
    assert (full.batch_sizes, full.new_tokens, full.k, full.ar, full.init_std) == ("1,8,32", 256, "1,2,3", "static", 0.02)


def test_a_failed_run_fails_the_script(tmp_path):
    """A reuse size the model cannot hold fails every reuse run: the script must exit non-zero."""
    out = tmp_path / "r.json"
    proc = subprocess.run([sys.executable, str(SCRIPT), "--tiny", "--batch-sizes", "1", "--new-tokens", "8",
                           "--k", "2", "--subsets", "first", "--cache", "on", "--fast-path", "off", "--reuse-size", "12",
                           "--ar", "off", "--no-floor", "--json-out", str(out)],
                          capture_output=True, text=True, timeout=600, stdin=subprocess.DEVNULL)
    assert proc.returncode == 1, proc.stdout[-2000:]
    assert "1 run(s) failed" in proc.stderr
    results = json.loads(out.read_text())
    assert len(results["runs"]) == 1 and len(results["errors"]) == 1  # the baseline ran, the reuse run failed
