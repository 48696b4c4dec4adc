"""The shipped demo model, its tokenizer, and the `arith` task it was trained on (CPU, offline)."""

from __future__ import annotations

import json
import os
import re
import shutil

import pytest
import torch

from dllm_generation import load_model
from dllm_generation.arith import data as arith_data
from dllm_generation.arith.data import build_test_set, chat_messages
from dllm_generation.arith.problems import Difficulty, Op, Split, generate, skeleton_split
from dllm_generation.eval.metrics import gsm8k
from dllm_generation.hub_format import ChecksumError, verify_checksums
from dllm_generation.loading import resolve_pretrained, shipped_model_path

pytestmark = pytest.mark.usefixtures("no_network")


@pytest.fixture(scope="module")
def demo():
    model, tokenizer = load_model("demo", dtype=torch.float32)
    tokenizer.padding_side = "left"
    return model, tokenizer


# ---------------------------------------------------------------------------- the shipped files
def test_shipped_model_is_small_and_in_the_hub_format():
    path = shipped_model_path("demo")
    size = sum(os.path.getsize(os.path.join(path, n)) for n in os.listdir(path))
    assert size <= 30 * 1024 * 1024
    with open(os.path.join(path, "config.json"), encoding="utf-8") as f:
        config = json.load(f)
    assert config["model_type"] == "Fast_dLLM_Qwen" and config["bd_size"] == 32
    assert config["num_hidden_layers"] == 14
    for name in ("tokenizer.json", "generation_config.json", "model.safetensors.index.json", "SHA256SUMS"):
        assert os.path.isfile(os.path.join(path, name)), name


def test_checksums_match_and_a_damaged_file_is_named(tmp_path):
    verify_checksums(shipped_model_path("demo"))
    copy = tmp_path / "demo"
    shutil.copytree(shipped_model_path("demo"), copy)
    shard = copy / "model-00002-of-00002.safetensors"
    original = shard.read_bytes()
    shard.write_bytes(original[:-10])
    with pytest.raises(ChecksumError, match="model-00002-of-00002.safetensors"):
        verify_checksums(str(copy))
    shard.write_bytes(original)
    (copy / "tokenizer.json").unlink()
    with pytest.raises(ChecksumError, match="tokenizer.json"):
        verify_checksums(str(copy))


def flip_one_weight_byte(folder) -> str:
    """Alter one byte in the middle of a shard's tensor data: safetensors still loads it."""
    shard = folder / "model-00001-of-00002.safetensors"
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0xFF
    shard.write_bytes(bytes(data))
    return shard.name


def test_a_copied_folder_is_checked_against_its_checksums_too(tmp_path, capsys):
    copy = tmp_path / "demo-copy"
    shutil.copytree(shipped_model_path("demo"), copy)
    name = flip_one_weight_byte(copy)
    with pytest.raises(ChecksumError, match=f"checksum mismatch for checkpoint file {copy / name}"):
        load_model(str(copy))
    from dllm_generation.eval.cli import main

    assert main("arith", ["--model", str(copy), "--limit", "2", "--output-dir", str(tmp_path / "out")]) == 1
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and "ChecksumError: checksum mismatch" in errors[0] and name in errors[0]
    (copy / "SHA256SUMS").unlink()  # a folder without checksums promises nothing: it loads
    load_model(str(copy))


@pytest.mark.parametrize("damage, expected", [
    ("missing", "the checksum file {sums} is missing"),
    ("empty", "the checksum file {sums} lists no files"),
    ("one field", "the checksum file {sums} has a malformed line"),
    ("not hex", "the checksum file {sums} has a malformed line"),
    ("binary", "the checksum file {sums} cannot be read"),
])
def test_a_missing_or_malformed_checksum_file_of_a_shipped_model_is_a_checksum_error(damage, expected, tmp_path):
    from dllm_generation.loading import verify_folder

    copy = tmp_path / "demo"
    shutil.copytree(shipped_model_path("demo"), copy)
    sums = copy / "SHA256SUMS"
    lines = sums.read_text().splitlines(keepends=True)
    content = {"missing": None, "empty": "", "one field": "".join(lines[1:]) + "deadbeef\n",
               "not hex": "z" * 64 + "  config.json\n" + "".join(lines), "binary": b"\xff\xfe\x00garbage"}[damage]
    if content is None:
        sums.unlink()
    elif isinstance(content, bytes):
        sums.write_bytes(content)
    else:
        sums.write_text(content)
    with pytest.raises(ChecksumError, match=re.escape(expected.format(sums=sums))):
        verify_folder(str(copy), shipped=True)


def test_a_corrupt_tokenizer_file_is_named_not_taken_for_a_missing_tokenizer(tmp_path):
    copy = tmp_path / "demo"
    shutil.copytree(shipped_model_path("demo"), copy)
    (copy / "tokenizer.json").write_text('{"version": "1.0", "model": ')  # cut short
    with pytest.raises(ChecksumError, match="tokenizer.json"):  # the folder's checksums see it first
        load_model(str(copy))
    (copy / "SHA256SUMS").unlink()
    with pytest.raises(ValueError, match=r"the tokenizer files of .*tokenizer.json.* do not load"):
        load_model(str(copy))


def test_loading_checks_the_shipped_files(monkeypatch):
    checked = []
    monkeypatch.setattr("dllm_generation.loading.verify_checksums", checked.append)
    assert resolve_pretrained("demo") == checked[0]


def test_unknown_model_name_lists_what_is_shipped():
    with pytest.raises(ValueError, match=r"unknown model 'dmeo'.*shipped: demo"):
        load_model("dmeo")


def test_tokenizer_has_what_decoding_and_chat_formatting_need(demo):
    model, tokenizer = demo
    assert tokenizer.convert_tokens_to_ids("|<MASK>|") == model.generation_config.mask_token_id
    assert tokenizer.eos_token == "<|im_end|>" and tokenizer.pad_token == "<|endoftext|>"
    text = tokenizer.apply_chat_template(chat_messages("Ava has 3 pens."), add_generation_prompt=True, tokenize=False)
    assert text == "<|im_start|>user\nAva has 3 pens.<|im_end|>\n<|im_start|>assistant\n"
    ids = tokenizer(text + "12 + 30 = 42", add_special_tokens=False)["input_ids"]
    assert tokenizer.decode(ids) == text + "12 + 30 = 42"
    assert tokenizer.convert_ids_to_tokens(tokenizer("1234", add_special_tokens=False)["input_ids"]) == list("1234")


# ---------------------------------------------------------------------------- the task
def test_arith_solutions_are_correct_and_within_the_difficulty():
    difficulty = Difficulty(min_steps=3, max_steps=4, max_operand=20, max_factor=4, max_value=150)
    for problem in generate(Split.TRAIN, 200, seed=3, difficulty=difficulty):
        assert 3 <= problem.steps <= 4
        value, chain = problem.skeleton
        for op, *operands in chain:
            op = Op(op)
            if op in (Op.ADD, Op.SUB):
                assert operands[0] <= 20
            value = {Op.ADD: value + operands[0], Op.SUB: value - operands[0], Op.MUL: value * operands[0],
                     Op.DIV: value // operands[0], Op.GROUPS: value + operands[0] * operands[-1]}[op]
            assert 0 < value <= 150
        assert problem.final == value
        assert gsm8k.extract_strict(problem.answer) == str(value)


def test_train_and_test_are_disjoint_by_construction():
    test = {json.dumps(p.skeleton) for p in generate(Split.TEST, 300)}
    train = [json.dumps(p.skeleton) for p in generate(Split.TRAIN, 3000)]
    assert all(skeleton_split(json.loads(s)) is Split.TEST for s in test)
    assert not test.intersection(train)


def test_shipped_test_set_is_the_generators_output():
    with open(arith_data.test_set_path(), encoding="utf-8") as f:
        shipped = [json.loads(line) for line in f]
    assert len(shipped) == 1000 and len({json.dumps(r["skeleton"]) for r in shipped}) == 1000
    regenerated = build_test_set(1000)
    assert [r["id"] for r in shipped] == [p.id for p in regenerated]
    assert [r["answer"] for r in shipped] == [p.answer for p in regenerated]


def test_difficulty_is_validated():
    with pytest.raises(ValueError, match="min_steps"):
        generate(Split.TRAIN, 1, difficulty=Difficulty(min_steps=5, max_steps=2))


# ---------------------------------------------------------------------------- the model decodes its task
def test_demo_model_solves_arith_in_parallel(demo):
    """Greedy, threshold 0.9, block cache on, no reuse: >= 90 % on a fixed 50-problem slice, and
    > 1.5 tokens per forward for a prompt decoded alone (rows never depend on their batch)."""
    model, tokenizer = demo
    problems = build_test_set(50)
    settings = dict(max_new_tokens=320, threshold=0.9, use_block_cache=True, return_dict_in_generate=True)
    texts = [tokenizer.apply_chat_template(chat_messages(p.question), add_generation_prompt=True, tokenize=False)
             for p in problems]
    correct = 0
    for start in range(0, len(problems), 25):
        batch = tokenizer(texts[start:start + 25], return_tensors="pt", padding=True, add_special_tokens=False)
        out = model.generate(**batch, **settings)
        for problem, row in zip(problems[start:start + 25], out.sequences[:, batch["input_ids"].shape[1]:]):
            correct += gsm8k.extract_strict(tokenizer.decode(row, skip_special_tokens=True)) == str(problem.final)
    assert correct / len(problems) >= 0.90, correct
    tokens = forwards = 0
    for text in texts[:8]:
        ids = tokenizer(text, return_tensors="pt", add_special_tokens=False)["input_ids"]
        stats = model.generate(input_ids=ids, **settings).stats
        tokens, forwards = tokens + stats["generated_tokens"], forwards + stats["forwards"]
    assert tokens / forwards > 1.5, tokens / forwards


def test_arith_grid_defaults_to_the_demo_model_and_prints_the_table(tmp_path, capsys):
    """`run_grid.py --task arith` needs no model, data or network flag, and ends with the table."""
    from dllm_generation.eval.cli import grid_main

    argv = ["--task", "arith", "--limit", "3", "--k", "1,2", "--subset", "first", "--batch-size", "3",
            "--output-dir", str(tmp_path), "--no-warmup"]
    assert grid_main(argv) == 0
    out = capsys.readouterr().out
    rows = [line for line in out.splitlines() if line.startswith("| k")]
    assert [row.split(" | ")[0] for row in rows] == ["| k1_first0.429_output", "| k2_first0.429_output"]
    assert "exact_match_strict" in out
    summary = json.loads((tmp_path / "arith" / "k1_first0.429_output" / "summary.json").read_text())
    assert summary["model"]["path"] == "demo" and summary["counts"]["samples"] == 3
