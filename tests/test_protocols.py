"""Named protocols: settings and their errors, the reference masked forward, and fork/paper runs end to end."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from dllm_generation.eval.options import EvalOptions, InvalidOptionError
from dllm_generation.eval.protocols import reference_budget, reference_rewrite, settings_for

REPO = Path(__file__).resolve().parents[1]
DATA = REPO.parent / "shared" / "data"


# ---------------------------------------------------------------------------- settings and errors
def test_defaults_are_the_fork_protocol_by_name():
    o = EvalOptions(task="gsm8k").validate()
    assert o.protocol == "fork"
    assert (o.threshold, o.use_block_cache, o.batch_size, o.num_fewshot, o.max_new_tokens) == (0.9, True, 1, 0, 2048)
    assert (o.block_size, o.small_block_size, o.chat_template, o.loglikelihood_forward) == (32, 8, True, "reference")


def test_paper_protocol_per_task():
    gsm = EvalOptions(task="gsm8k", protocol="paper").validate()
    assert (gsm.threshold, gsm.use_block_cache, gsm.batch_size, gsm.num_fewshot) == (1.0, False, 32, 0)
    mmlu = EvalOptions(task="mmlu", protocol="paper").validate()
    assert (mmlu.batch_size, mmlu.num_fewshot) == (1, 5)
    assert EvalOptions(task="mmlu").validate().num_fewshot == 0
    assert settings_for("paper", "gpqa").num_fewshot == 0


@pytest.mark.parametrize(("changes", "needle"), [
    ({"batch_size": 32}, "--batch-size=32 contradicts --protocol fork (batch_size=1 for gsm8k)"),
    ({"threshold": 1.0}, "--threshold=1.0 contradicts --protocol fork"),
    ({"use_block_cache": False}, "--use-block-cache=False contradicts --protocol fork"),
    ({"protocol": "paper", "num_fewshot": 5}, "--num-fewshot=5 contradicts --protocol paper (num_fewshot=0 for gsm8k)"),
    ({"protocol": "forked"}, "protocol='forked' is not allowed (allowed: fork, paper, custom)"),
])
def test_contradictions_are_one_line_errors(changes, needle):
    with pytest.raises(InvalidOptionError) as err:
        EvalOptions(task="gsm8k", **changes).validate()
    assert needle in str(err.value) and "\n" not in str(err.value)


def test_documented_overrides_are_recorded_and_custom_frees_everything():
    o = EvalOptions(task="gsm8k", max_new_tokens=64, dtype="float32").validate()
    assert o.overrides() == {"max_new_tokens": 64, "dtype": "float32"}
    c = EvalOptions(task="gsm8k", protocol="custom", batch_size=8, threshold=0.5).validate()
    assert (c.batch_size, c.threshold, c.use_block_cache) == (8, 0.5, True)
    assert c.config_name() == "k1_first0.429_output_custom_t0.5"  # batch size is not part of a config's name


@pytest.mark.parametrize("protocol", ["fork", "paper"])
def test_arith_gets_the_demo_models_own_settings_and_a_free_batch_size(protocol):
    o = EvalOptions(task="arith", protocol=protocol).validate()
    assert o.model == "demo"
    assert (o.threshold, o.use_block_cache, o.chat_template, o.num_fewshot, o.max_new_tokens) == (0.9, True, True, 0, 320)
    assert (o.block_size, o.small_block_size, o.dtype, o.batch_size) == (32, 8, "auto", 8)
    assert o.overrides() == {}
    wide = EvalOptions(task="arith", protocol=protocol, batch_size=64).validate()
    assert wide.batch_size == 64 and wide.overrides() == {"batch_size": 64}
    assert wide.config_name() == o.config_name()
    with pytest.raises(InvalidOptionError) as err:
        EvalOptions(task="arith", protocol=protocol, threshold=0.5).validate()
    assert f"--threshold=0.5 contradicts --protocol {protocol} (threshold=0.9 for arith)" in str(err.value)
    assert "allowed overrides: max_new_tokens, dtype, fast_path, batch_size" in str(err.value)


def test_cli_rejects_a_contradiction_before_loading(capsys):
    from dllm_generation.eval.cli import main

    with pytest.raises(SystemExit):
        main("gsm8k", ["--protocol", "fork", "--batch-size", "32", "--model", "/nonexistent"])
    assert "--batch-size=32 contradicts --protocol fork" in capsys.readouterr().err


def test_reference_rewrite_keeps_two_braces_and_replaces_every_occurrence():
    text = "Question: Answer: x?\nAnswer:"
    out = reference_rewrite("gsm8k", text)
    assert out == ("Question: Please reason step by step, and put your final answer within \\boxed{{}}. x?\n"
                   "Please reason step by step, and put your final answer within \\boxed{{}}.")
    assert reference_rewrite("minerva_math_algebra", "Solution:").endswith("\\boxed{{}}.")
    assert reference_rewrite("ifeval", "Answer:") == "Answer:"


def test_reference_budget_ends_on_a_block_boundary():
    # eval.py: blocks up to max_new_tokens//bs + L//bs (absolute), plus the commit forward's token.
    assert reference_budget(100, 2048, 32) == (64 + 3) * 32 + 1 - 100
    assert reference_budget(64, 2048, 32) == 2048 + 1


def test_reference_token_count_rounds_to_the_eos_block():
    from dllm_generation.eval.model_calls import reference_token_counts

    eos = {9}
    # one row: EOS at new index 3, prompt 30 -> block end at 64 -> 34 tokens
    assert reference_token_counts([30], [[1, 2, 3, 9, 0]], eos, 32, [100]) == [34]
    # a batch: the early finisher gets the extra pad token, the last one does not; no EOS -> the budget
    assert reference_token_counts([30, 30], [[9], [1] * 40 + [9]], eos, 32, [99, 99]) == [3, 66]
    assert reference_token_counts([30, 30], [[9], [1] * 50], eos, 32, [99, 77]) == [3, 77]


# ---------------------------------------------------------------------------- the masked forward
def eval_py_loglikelihood(model, prefix, target, mask_id, eos_id, bs):
    """Fast-dLLM v2 eval.py's get_loglikelihood, written out over the stock transformers forward."""
    seq = torch.tensor(prefix + target)[None]
    length = seq.shape[1]
    perturbed = seq.clone()
    perturbed[:, len(prefix)] = mask_id
    perturbed = torch.cat([perturbed, torch.full((1, bs - length % bs), mask_id)], dim=1)
    perturbed[:, length] = eos_id
    n = perturbed.shape[1]
    idx = torch.arange(n)
    allowed = (idx[None, :] // bs) <= (idx[:, None] // bs)
    hidden = model.model(input_ids=perturbed, attention_mask=allowed[None, None], position_ids=idx[None],
                         use_cache=False).last_hidden_state
    logits = model.lm_head(hidden).float()
    logits = torch.cat([logits[:, :1], logits[:, :-1]], dim=1)
    labels = torch.cat([seq, torch.full((1, bs - length % bs), -100)], dim=1)
    masked = perturbed == mask_id
    return -F.cross_entropy(logits[masked], labels[masked], reduction="none").sum().item()


def test_reference_forward_equals_eval_py(tiny_model):
    from dllm_generation.scoring import loglikelihood

    mask, eos, bs = 511, 510, 8
    gen = torch.Generator().manual_seed(3)
    contexts = [torch.randint(0, 500, (n,), generator=gen).tolist() for n in (5, 7, 13, 16, 3)]
    conts = [[11], [12, 13, 14], [15], [16, 17], [18, 19, 20, 21, 22]]  # 7+... ends exactly on a boundary too
    contexts[1] = contexts[1][:5]  # 5 + 3 = 8: the padding is a whole extra block
    mine, _ = loglikelihood(tiny_model, contexts, conts, batch_size=3, mask_token_id=mask, block_size=bs,
                            forward="reference", eos_token_id=eos)
    ref = [eval_py_loglikelihood(tiny_model, c, x, mask, eos, bs) for c, x in zip(contexts, conts)]
    assert mine == pytest.approx(ref, abs=1e-4)
    other, _ = loglikelihood(tiny_model, contexts, conts, batch_size=3, mask_token_id=mask, block_size=bs,
                             forward="masked_continuation")
    assert other[1] != pytest.approx(mine[1], abs=1e-3)  # the variants differ for multi-token answers


# ---------------------------------------------------------------------------- runs end to end
pytestmark_data = pytest.mark.skipif(not DATA.is_dir(), reason=f"shared data folder {DATA} is absent")


@pytestmark_data
@pytest.mark.parametrize(("protocol", "task", "files"), [
    ("fork", "gsm8k", ["gsm8k/test.jsonl"]),
    ("paper", "gsm8k", ["gsm8k/test.jsonl"]),
    ("paper", "mmlu", ["mmlu"]),
    ("fork", "minerva_math", ["math500/test.jsonl"]),
])
def test_protocol_runs_end_to_end_offline(protocol, task, files, tokenizer_path, tmp_path, monkeypatch, capsys):
    from dllm_generation.eval.cli import main

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    argv = ["--protocol", protocol, "--model", tokenizer_path, "--output-dir", str(tmp_path), "--limit", "2",
            "--max-new-tokens", "40", "--dtype", "float32", "--no-warmup", "--data-files",
            *[str(DATA / f) for f in files], "--k", "2", "--size", "1"]
    assert main(task, argv) == 0
    (summary_path,) = list(tmp_path.glob(f"{task}/*/summary.json"))
    summary = json.loads(summary_path.read_text())
    assert summary["protocol"]["name"] == protocol
    assert summary["protocol"]["overrides"] == {"max_new_tokens": 40, "dtype": "float32"}
    assert summary["prompting"]["lm_eval_task"] in ("gsm8k", "mmlu", "minerva_math")
    assert summary["accuracy_stderr"] is not None and summary["throughput"]["end_to_end_seconds"] > 0
    tp = summary["throughput"]
    if task == "mmlu":
        assert summary["prompting"]["num_fewshot"] == 5 and set(summary["groups"]) == {"subjects", "categories", "total"}
        assert summary["generation"]["loglikelihood_forward"] == "reference"
    else:
        assert tp["reference"]["tokens_generated"] >= tp["generated_tokens"] > 0
        assert tp["fast_path_ran"] == ["off (device is cpu, not CUDA)"]
        assert summary["generation"]["threshold"] == (0.9 if protocol == "fork" else 1.0)
    if task == "minerva_math":
        assert summary["groups"]["total"]["n"] == 2


def test_arith_runs_under_the_default_protocol_with_its_own_batch_size(tmp_path, capsys):
    """The demo model's task needs no protocol flag: the shipped test set, the demo model, 320 new tokens."""
    from dllm_generation.eval.cli import main

    argv = ["--limit", "2", "--batch-size", "2", "--output-dir", str(tmp_path), "--no-warmup"]
    assert main("arith", argv) == 0
    summary = json.loads((tmp_path / "arith" / "k1_first0.429_output" / "summary.json").read_text())
    assert summary["protocol"]["name"] == "fork" and summary["protocol"]["overrides"] == {"batch_size": 2}
    assert summary["primary_metric"] == "exact_match_strict" and summary["counts"]["samples"] == 2
    gen = summary["generation"]
    assert (gen["max_new_tokens"], gen["threshold"], gen["use_block_cache"], gen["batch_size"]) == (320, 0.9, True, 2)
    assert summary["prompting"]["num_fewshot"] == 0 and summary["prompting"]["chat_template"] is True
    assert summary["model"]["path"] == "demo" and summary["dataset"]["total"] == 1000
    assert "arith/k1_first0.429_output" in capsys.readouterr().out


@pytestmark_data
@pytest.mark.parametrize("protocol", ["fork", "paper"])
def test_gsm8k_protocols_run_on_the_shipped_demo_model(protocol, tmp_path):
    """A real trained checkpoint (not a random one) goes through each protocol's GSM8K path offline."""
    from dllm_generation.eval.cli import main

    argv = ["--protocol", protocol, "--model", "demo", "--output-dir", str(tmp_path), "--limit", "1",
            "--max-new-tokens", "32", "--no-warmup", "--data-files", str(DATA / "gsm8k" / "test.jsonl")]
    assert main("gsm8k", argv) == 0
    (summary_path,) = list(tmp_path.glob("gsm8k/*/summary.json"))
    summary = json.loads(summary_path.read_text())
    assert summary["protocol"]["name"] == protocol and summary["model"]["path"] == "demo"
    assert summary["counts"]["samples"] == 1 and summary["throughput"]["generated_tokens"] > 0
