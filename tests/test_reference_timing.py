"""benchmarks/reference_sampler_timing.py: it times the sampler on the throughput benchmark's own prompts, hands it
the adapter's arguments (right padding with the mask, no layer reuse), counts each row's tokens up to the ask,
writes a file that `--reference-json` accepts, and stops bad arguments with one line before building anything.

The real reference needs the checkpoint's remote code and transformers 4.53; here a stand-in remote code (a
configuration and a model of transformers' own Qwen2 classes) and a stand-in `batch_sample` that records its
arguments take their place."""

from __future__ import annotations

import importlib.util
import json
import textwrap
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


def _load(name: str):
    spec = importlib.util.spec_from_file_location(f"bench_{name}", BENCHMARKS / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture(scope="module")
def timing():
    return _load("reference_sampler_timing")


TINY_CONFIG = {"architectures": ["StandInForCausalLM"], "model_type": "stand_in_qwen", "hidden_size": 16,
               "intermediate_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2, "num_key_value_heads": 1,
               "vocab_size": 151680, "layer_types": ["full_attention"] * 2, "max_window_layers": 2,
               "auto_map": {"AutoConfig": "configuration.StandInConfig",
                            "AutoModelForCausalLM": "modeling.StandInForCausalLM"}}

# Each row's new tokens: the first row 13 short of the ask, the others 20 beyond it (what the real sampler's
# whole blocks give rows of the longest and of shorter prompts).
SAMPLER = textwrap.dedent('''
    import json, os
    import torch

    class Fast_dLLM_QwenForCausalLM:
        def batch_sample(self, input_ids, tokenizer, block_size, max_new_tokens, small_block_size, min_len, seq_len,
                         reuse_k, layer_subset=None, mask_id=151665, threshold=0.95, stop_token=151645,
                         use_block_cache=False, top_p=0.95, temperature=0.0):
            with open(os.environ["SAMPLER_LOG"], "a") as f:
                f.write(json.dumps({"ids": input_ids.tolist(), "seq_len": seq_len.tolist(), "min_len": min_len,
                                    "reuse_k": reuse_k, "cache": use_block_cache, "threshold": threshold,
                                    "block": block_size, "small": small_block_size, "new": max_new_tokens,
                                    "mask": mask_id, "stop": stop_token, "pad": tokenizer.pad_token_id,
                                    "lm_head_stop_rows": self.lm_head.weight[[151645, 151643]].abs().sum().item()}) + "\\n")
            out = {}
            for row, n in enumerate(seq_len.tolist()):
                extra = max_new_tokens - 13 if row == 0 else max_new_tokens + 20
                out[row] = torch.zeros(n + extra, dtype=torch.long)
            return out
''')


@pytest.fixture
def stand_in(tmp_path, monkeypatch):
    model_dir = tmp_path / "checkpoint"
    model_dir.mkdir()
    (model_dir / "config.json").write_text(json.dumps(TINY_CONFIG))
    (model_dir / "configuration.py").write_text(textwrap.dedent('''
        from transformers import Qwen2Config

        class StandInConfig(Qwen2Config):
            model_type = "stand_in_qwen"
    '''))
    (model_dir / "modeling.py").write_text(textwrap.dedent('''
        from transformers import Qwen2ForCausalLM
        from .configuration import StandInConfig

        class StandInForCausalLM(Qwen2ForCausalLM):
            config_class = StandInConfig
    '''))
    sampler = tmp_path / "generation_functions.py"
    sampler.write_text(SAMPLER)
    log = tmp_path / "calls.jsonl"
    monkeypatch.setenv("SAMPLER_LOG", str(log))
    return model_dir, sampler, log


def test_times_the_benchmarks_prompts_with_the_adapters_arguments_and_counts_up_to_the_ask(timing, stand_in, tmp_path):
    model_dir, sampler, log = stand_in
    out = tmp_path / "reference.json"
    assert timing.main(["--model-dir", str(model_dir), "--generation-functions", str(sampler), "--device", "cpu",
                        "--batch-sizes", "1,3", "--cache", "on,off", "--new-tokens", "64", "--repeats", "2",
                        "--json-out", str(out)]) == 0
    calls = [json.loads(line) for line in log.read_text().splitlines()]
    assert len(calls) == 2 * 2 * 3  # (batch, cache) x (untimed + 2 timed)

    throughput = _load("throughput")
    bench_args = throughput.parse_args(["--tiny", "--batch-sizes", "3"])
    bench_args.prompt_min, bench_args.prompt_max = 96, 160
    for batch, call in ((1, calls[0]), (3, calls[-1])):
        ids, mask = throughput.make_prompts(bench_args, batch, vocab_high=151643)
        bench_prompts = [row[m.bool()].tolist() for row, m in zip(ids.cpu(), mask.cpu())]
        width = max(map(len, bench_prompts))
        assert call["seq_len"] == [len(p) for p in bench_prompts] and call["min_len"] == min(call["seq_len"])
        assert call["ids"] == [p + [151665] * (width - len(p)) for p in bench_prompts]  # right-padded with the mask
    assert {(c["reuse_k"], c["threshold"], c["block"], c["small"], c["new"], c["mask"], c["stop"], c["pad"])
            for c in calls} == {(1, 0.9, 32, 8, 64, 151665, 151645, 151643)}
    assert [c["cache"] for c in calls] == [True] * 3 + [False] * 3 + [True] * 3 + [False] * 3
    assert {c["lm_head_stop_rows"] for c in calls} == {0.0}

    results = json.loads(out.read_text())
    runs = {(r["batch"], r["cache"]): r for r in results["runs"]}
    assert set(runs) == {(1, "on"), (1, "off"), (3, "on"), (3, "off")}
    assert runs[(1, "on")]["counted_tokens"] == 64 - 13 and runs[(1, "on")]["generated_tokens"] == 64 - 13
    assert runs[(3, "on")]["counted_tokens"] == (64 - 13) + 2 * 64
    assert runs[(3, "on")]["generated_tokens"] == (64 - 13) + 2 * (64 + 20)
    for run in results["runs"]:
        assert len(run["walls"]) == 2
        assert run["tokens_per_second"] == pytest.approx(run["counted_tokens"] / run["wall_seconds"], rel=2e-2)
    assert results["environment"]["transformers"] and len(results["environment"]["modeling_sha256"]) == 64

    reader = _load("reference_sampler")
    loaded = reader.load_reference(str(out), ["random", "target"])
    assert reader.reference_tokens_per_second(loaded, 3, True, "random") == runs[(3, "on")]["tokens_per_second"]
    assert reader.reference_tokens_per_second(loaded, 3, True, "target") is None  # timed on the random workload only


@pytest.mark.parametrize("change, option", [
    ({"--batch-sizes": "1,0"}, "--batch-sizes"),
    ({"--cache": "maybe"}, "--cache"),
    ({"--new-tokens": "100"}, "--new-tokens"),
    ({"--small-block-size": "5"}, "--small-block-size"),
    ({"--threshold": "1.5"}, "--threshold"),
    ({"--generation-functions": "/nonexistent/generation_functions.py"}, "--generation-functions"),
    ({"--device": "tpu"}, "--device"),
])
def test_bad_arguments_end_with_one_line_before_any_model(timing, stand_in, monkeypatch, capsys, tmp_path, change, option):
    model_dir, sampler, _ = stand_in
    monkeypatch.setattr(timing, "build_reference_model", lambda *a, **k: pytest.fail("a model was built"))
    argv = {"--model-dir": str(model_dir), "--generation-functions": str(sampler), "--device": "cpu",
            "--json-out": str(tmp_path / "r.json"), **change}
    with pytest.raises(SystemExit) as stop:
        timing.main([part for pair in argv.items() for part in pair])
    assert stop.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and option in err, err


def test_a_model_folder_without_the_remote_code_is_named(timing, stand_in, capsys, tmp_path):
    model_dir, sampler, _ = stand_in
    (model_dir / "modeling.py").unlink()
    with pytest.raises(SystemExit) as stop:
        timing.parse_args(["--model-dir", str(model_dir), "--generation-functions", str(sampler),
                           "--json-out", str(tmp_path / "r.json")])
    assert stop.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "modeling.py" in err and "--model-dir" in err


def test_the_prompts_are_drawn_like_the_throughput_benchmarks(timing):
    """The prompts it draws (benchmarks/workload.py's) are those of benchmarks/throughput.py's make_prompts, batch by
    batch, once their left padding is taken off."""
    throughput = _load("throughput")
    for batch in (1, 8, 32):
        args = throughput.parse_args(["--tiny", "--seed", "3"])
        args.prompt_min, args.prompt_max = 96, 160
        ids, mask = throughput.make_prompts(args, batch, vocab_high=151643)
        expected = [row[m.bool()].tolist() for row, m in zip(ids.cpu(), mask.cpu())]
        assert timing.workload.benchmark_prompts(3, batch, 96, 160, 151643) == expected


def test_cuda_asked_for_where_there_is_none_is_one_line(timing, stand_in, capsys, tmp_path):
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    model_dir, sampler, _ = stand_in
    with pytest.raises(SystemExit) as stop:
        timing.parse_args(["--model-dir", str(model_dir), "--generation-functions", str(sampler),
                           "--json-out", str(tmp_path / "r.json")])  # --device defaults to cuda
    assert stop.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--device cuda" in err and "not available" in err


def test_a_file_without_the_sampler_stops_before_any_model(timing, stand_in, monkeypatch, capsys, tmp_path):
    model_dir, _, _ = stand_in
    other = tmp_path / "other.py"
    other.write_text("class Fast_dLLM_QwenForCausalLM:\n    pass\n")
    monkeypatch.setattr(timing, "build_reference_model", lambda *a, **k: pytest.fail("a model was built"))
    with pytest.raises(SystemExit) as stop:
        timing.main(["--model-dir", str(model_dir), "--generation-functions", str(other), "--device", "cpu",
                     "--json-out", str(tmp_path / "r.json")])
    assert stop.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "batch_sample" in err and "--generation-functions" in err
