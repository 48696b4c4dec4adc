"""Block-diffusion training: the objective's pattern and targets, the collator, checks, and learning."""

from __future__ import annotations

import random

import pytest
import torch
from transformers import Qwen2Config, Qwen2ForCausalLM, TrainingArguments

from dllm_generation import attach_block_diffusion
from dllm_generation.training import (
    BlockDiffusionCollator,
    BlockDiffusionTrainer,
    TrainingDataError,
    block_diffusion_attention,
    block_diffusion_labels,
    prepare_for_block_diffusion,
    validate_training_setup,
)
from dllm_generation.training.objective import IGNORE_INDEX

PAD, EOS, MASK, SEP, DIGIT0 = 0, 2, 3, 14, 4
BLOCK = 8


def tiny_config(layers: int = 2) -> Qwen2Config:
    config = Qwen2Config(vocab_size=32, hidden_size=64, intermediate_size=128, num_hidden_layers=layers,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                         tie_word_embeddings=True, eos_token_id=EOS, pad_token_id=PAD,
                         layer_types=["full_attention"] * layers)
    config.bd_size, config.mask_token_id = BLOCK, MASK
    return config


def copy_example(rng: random.Random) -> dict:
    """Toy task: 8 digits and a separator; the answer repeats the digits, then stops."""
    digits = [DIGIT0 + rng.randrange(10) for _ in range(8)]
    return {"input_ids": digits + [SEP] + digits + [EOS], "prompt_length": 9}


class CopyTask(torch.utils.data.Dataset):
    def __len__(self):
        return 1_000_000

    def __getitem__(self, index):
        return copy_example(random.Random(index))


def train_copy(tmp_path, steps: int):
    torch.manual_seed(0)
    model = Qwen2ForCausalLM(tiny_config())
    args = TrainingArguments(output_dir=str(tmp_path), max_steps=steps, per_device_train_batch_size=32,
                             learning_rate=3e-3, warmup_steps=10, lr_scheduler_type="cosine", logging_steps=10,
                             save_strategy="no", report_to="none", remove_unused_columns=False, disable_tqdm=True,
                             use_cpu=True, seed=0, dataloader_num_workers=0)
    collator = BlockDiffusionCollator(BLOCK, MASK, PAD, generator=torch.Generator().manual_seed(0))
    trainer = BlockDiffusionTrainer(model=model, args=args, train_dataset=CopyTask(), data_collator=collator,
                                    block_size=BLOCK)
    trainer.train()
    return model.eval(), [e["loss"] for e in trainer.state.log_history if "loss" in e]


# ---------------------------------------------------------------------------- the objective
def test_attention_pattern_is_the_decoders():
    """Noisy block b sees itself and clean blocks < b; clean block b sees clean blocks <= b."""
    length, bs = 12, 4
    pattern = block_diffusion_attention(length, bs)
    for q in range(2 * length):
        for k in range(2 * length):
            qb, kb = (q % length) // bs, (k % length) // bs
            if q < length:  # noisy query
                expected = (k < length and kb == qb) or (k >= length and kb < qb)
            else:
                expected = k >= length and kb <= qb
            assert bool(pattern[q, k]) == expected, (q, k)


def test_labels_are_shifted_and_block_first_tokens_come_from_the_clean_half():
    bs = 4
    clean = torch.arange(10, 22)[None]  # L = 12
    noised = torch.zeros_like(clean, dtype=torch.bool)
    noised[0, [2, 5, 7]] = True
    scored = torch.zeros_like(noised)
    scored[0, 3:] = True  # prompt is slots 0-2
    labels = block_diffusion_labels(clean, noised, scored, bs)[0]
    expected = [IGNORE_INDEX] * 24
    for j in (2, 5, 7):  # noisy slot j-1 predicts token j
        expected[j - 1] = int(clean[0, j])
    for j in (4, 8):  # first token of an answer block: last clean slot of the block before
        expected[12 + j - 1] = int(clean[0, j])
    assert labels.tolist() == expected


def test_training_forward_equals_the_inference_forward():
    """The noisy half's logits are what a block-causal forward over [clean prefix ; noisy block] gives."""
    torch.manual_seed(0)
    model = Qwen2ForCausalLM(tiny_config(layers=2)).eval()
    length = 3 * BLOCK
    clean = torch.randint(4, 30, (1, length))
    noisy = clean.clone()
    noisy[0, [17, 18, 21]] = MASK  # inside block 2
    tokens = torch.cat([noisy, clean], 1)
    positions = torch.arange(length).repeat(2)[None]
    pattern = block_diffusion_attention(length, BLOCK)[None, None]
    with torch.no_grad():
        train_logits = model(input_ids=tokens, attention_mask=pattern, position_ids=positions).logits
        seq = torch.cat([clean[:, : 2 * BLOCK], noisy[:, 2 * BLOCK:]], 1)
        idx = torch.arange(length)
        block_causal = ((idx[None, :] // BLOCK) <= (idx[:, None] // BLOCK))[None, None]
        infer_logits = model(input_ids=seq, attention_mask=block_causal, position_ids=idx[None]).logits
    torch.testing.assert_close(train_logits[:, 2 * BLOCK: 3 * BLOCK], infer_logits[:, 2 * BLOCK:], rtol=1e-5, atol=1e-5)
    # The clean half at the end of block 1 is the commit forward's last position.
    torch.testing.assert_close(train_logits[:, length + 2 * BLOCK - 1], infer_logits[:, 2 * BLOCK - 1],
                               rtol=1e-5, atol=1e-5)


def test_collator_masks_are_complementary_and_spare_prompt_and_block_starts():
    collator = BlockDiffusionCollator(BLOCK, MASK, PAD, generator=torch.Generator().manual_seed(1))
    examples = [copy_example(random.Random(i)) for i in range(6)]
    batch = collator(examples)
    n = len(examples)
    assert batch["clean"].shape == (2 * n, 24) and batch["noisy"].shape == (2 * n, 24)
    first, second = batch["noisy"][:n] == MASK, batch["noisy"][n:] == MASK
    assert not (first & second).any()
    answer = torch.zeros(24, dtype=torch.bool)
    answer[9:24] = True  # answer, stop token and the pad slots of its block
    maskable = answer & (torch.arange(24) % BLOCK != 0)
    assert ((first | second) == maskable[None]).all()
    assert not batch["noisy"][:, :9].eq(MASK).any()
    assert (batch["clean"][:, 18:] == PAD).all()


def test_collator_rejects_an_example_without_answer():
    collator = BlockDiffusionCollator(BLOCK, MASK, PAD)
    with pytest.raises(TrainingDataError, match="example 1: no answer span"):
        collator([copy_example(random.Random(0)), {"input_ids": [5, 6, 7], "prompt_length": 3}])


# ---------------------------------------------------------------------------- checks before the first step
def test_validation_rejects_disagreeing_block_size_and_answerless_data():
    from dllm_generation.arith.tokenizer import build_tokenizer

    tokenizer = build_tokenizer(["12 + 3 = 15", "user\nassistant\n"], vocab_size=300)
    mask = tokenizer.convert_tokens_to_ids("|<MASK>|")
    config = tiny_config()
    config.vocab_size, config.mask_token_id = len(tokenizer), mask
    model = Qwen2ForCausalLM(config)
    good = {"input_ids": [5, 6, 7, 8], "prompt_length": 2}
    validate_training_setup(model, tokenizer, [good], BLOCK, mask)
    with pytest.raises(ValueError, match="block_size=32 disagrees with the model config's bd_size=8"):
        validate_training_setup(model, tokenizer, [good], 32, mask)
    with pytest.raises(TrainingDataError, match="example 1: no answer span"):
        validate_training_setup(model, tokenizer, [good, {"input_ids": [5, 6], "prompt_length": 2}], BLOCK, mask)
    with pytest.raises(ValueError, match="mask_token_id=1 disagrees"):
        validate_training_setup(model, tokenizer, [good], BLOCK, 1)


def test_an_autoregressive_checkpoint_is_prepared_and_trains(tmp_path):
    """Continuing from an AR model: the mask token is added (embeddings grow) and a step runs."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    core = Tokenizer(models.WordLevel({w: i for i, w in enumerate(["<pad>", "<eos>", "a", "b", "c"])}, unk_token="<pad>"))
    core.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=core, pad_token="<pad>", eos_token="<eos>")
    config = Qwen2Config(vocab_size=5, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, layer_types=["full_attention"] * 2)
    model = Qwen2ForCausalLM(config)
    model, tokenizer = prepare_for_block_diffusion(model, tokenizer, BLOCK)
    mask = tokenizer.convert_tokens_to_ids("|<MASK>|")
    assert mask == 5 and model.get_input_embeddings().weight.shape[0] == 6
    assert model.config.bd_size == BLOCK and model.config.mask_token_id == mask
    examples = [{"input_ids": [2, 3, 4, 2, 3, 4, 1], "prompt_length": 3}] * 4
    validate_training_setup(model, tokenizer, examples, BLOCK, mask)
    args = TrainingArguments(output_dir=str(tmp_path), max_steps=2, per_device_train_batch_size=4, report_to="none",
                             remove_unused_columns=False, use_cpu=True, save_strategy="no", disable_tqdm=True)
    trainer = BlockDiffusionTrainer(model=model, args=args, train_dataset=examples, block_size=BLOCK,
                                    data_collator=BlockDiffusionCollator(BLOCK, mask, tokenizer.pad_token_id))
    result = trainer.train()
    assert torch.isfinite(torch.tensor(result.training_loss))


# ---------------------------------------------------------------------------- learning
def test_loss_falls(tmp_path):
    _, losses = train_copy(tmp_path, steps=40)
    assert losses[-1] < 0.6 * losses[0], losses


@pytest.mark.slow
def test_a_trained_toy_model_decodes_its_task_through_generate(tmp_path):
    """A few hundred steps on copying, then `generate` (block diffusion, threshold 0.9) copies held-out rows."""
    model, losses = train_copy(tmp_path, steps=200)
    assert losses[-1] < 0.05, losses
    view = attach_block_diffusion(model, mask_token_id=MASK)
    rng = random.Random(10**7)  # rows the training stream never reaches
    rows = [copy_example(rng) for _ in range(50)]
    prompts = torch.tensor([r["input_ids"][:9] for r in rows])
    out = view.generate(input_ids=prompts, max_new_tokens=9, block_size=BLOCK, small_block_size=4, threshold=0.9,
                        eos_token_id=EOS, pad_token_id=PAD, return_dict_in_generate=True)
    correct = sum(new == r["input_ids"][9:] for new, r in zip(out.sequences[:, 9:].tolist(), rows))
    assert correct >= 48, correct
    assert out.stats["tokens_per_forward"] > 1.0
