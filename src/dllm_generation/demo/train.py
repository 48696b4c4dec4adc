"""Train the shipped `demo` model: a 14-layer Qwen2 block-diffusion model for `arith`.

    python -m dllm_generation.demo.train --output-dir runs/demo

The defaults are the exact settings the shipped model was trained with (one GPU, bf16). A run
resumes from the newest checkpoint in `--output-dir` when stopped; the finished model is written in
the Fast_dLLM hub format to `<output-dir>/model` with its loss log and loss curve.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time

import torch

from ..arith.data import ArithTrainingSet, tokenizer_corpus
from ..arith.tokenizer import build_tokenizer
from ..hub_format import save_hub_checkpoint
from ..loading import mask_token_id_from_tokenizer
from ..training import BlockDiffusionCollator, BlockDiffusionTrainer, validate_training_setup
from ..training.reporting import TimeLimit, plot_loss, versions

logger = logging.getLogger(__name__)

BLOCK_SIZE = 32


def model_config(vocab_size: int, args):
    from transformers.models.qwen2 import Qwen2Config

    return Qwen2Config(
        vocab_size=vocab_size, hidden_size=args.hidden_size, intermediate_size=args.intermediate_size,
        num_hidden_layers=args.layers, num_attention_heads=args.heads, num_key_value_heads=args.kv_heads,
        max_position_embeddings=2048, rope_theta=10000.0, rms_norm_eps=1e-6, tie_word_embeddings=True,
        use_sliding_window=False, max_window_layers=args.layers, layer_types=["full_attention"] * args.layers,
        hidden_act="silu", initializer_range=0.02,
    )


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--output-dir", required=True, help="checkpoints, logs and the finished model (<dir>/model)")
    p.add_argument("--seed", type=int, default=0, help="seed of the model init, the data order and the masks")
    p.add_argument("--max-steps", type=int, default=2500, help="optimizer steps")
    p.add_argument("--batch-size", type=int, default=128, help="examples per step (each is used twice: mask m "
                   "and its complement)")
    p.add_argument("--lr", type=float, default=1.5e-3, help="peak learning rate (AdamW, linear warm-up, cosine decay)")
    p.add_argument("--warmup-steps", type=int, default=200)
    p.add_argument("--weight-decay", type=float, default=0.1)
    p.add_argument("--layers", type=int, default=14)
    p.add_argument("--hidden-size", type=int, default=256)
    p.add_argument("--intermediate-size", type=int, default=768)
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--kv-heads", type=int, default=2)
    p.add_argument("--vocab-size", type=int, default=512, help="byte-level BPE size, special tokens included")
    p.add_argument("--tokenizer-corpus", type=int, default=20000, help="training problems the tokenizer is fitted on")
    p.add_argument("--save-steps", type=int, default=500, help="checkpoint every N steps (resume point)")
    p.add_argument("--workers", type=int, default=min(8, os.cpu_count() or 1), help="data-loader processes")
    p.add_argument("--precision", choices=("bf16", "fp32"), default="bf16" if torch.cuda.is_available() else "fp32")
    p.add_argument("--time-limit-minutes", type=float, default=None,
                   help="stop with a checkpoint after this long, export what exists (exit code 3); rerun to resume")
    p.add_argument("--max-shard-size", default="15MB", help="largest weight file of the saved model")
    p.add_argument("--save-dtype", choices=("bfloat16", "float32"), default="bfloat16",
                   help="dtype of the saved weights (bf16 keeps the shipped model under 30 MB)")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    from transformers import AutoTokenizer, Qwen2ForCausalLM, TrainingArguments, set_seed
    from transformers.trainer_utils import get_last_checkpoint

    os.makedirs(args.output_dir, exist_ok=True)
    tokenizer_dir = os.path.join(args.output_dir, "tokenizer")
    if os.path.exists(os.path.join(tokenizer_dir, "tokenizer.json")):
        tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    else:
        tokenizer = build_tokenizer(tokenizer_corpus(args.tokenizer_corpus, seed=args.seed), args.vocab_size)
        tokenizer.save_pretrained(tokenizer_dir)
    mask_id = mask_token_id_from_tokenizer(tokenizer)

    set_seed(args.seed)
    config = model_config(len(tokenizer), args)
    config.bd_size, config.mask_token_id = BLOCK_SIZE, mask_id
    config.eos_token_id, config.pad_token_id = tokenizer.eos_token_id, tokenizer.pad_token_id
    model = Qwen2ForCausalLM(config)
    train_set = ArithTrainingSet(tokenizer, args.max_steps * args.batch_size, seed=args.seed)
    validate_training_setup(model, tokenizer, [train_set[i] for i in range(64)], BLOCK_SIZE, mask_id)
    logger.info("model: %.2fM parameters", sum(p.numel() for p in model.parameters()) / 1e6)

    training_args = TrainingArguments(
        output_dir=args.output_dir, max_steps=args.max_steps, per_device_train_batch_size=args.batch_size,
        learning_rate=args.lr, warmup_steps=args.warmup_steps, lr_scheduler_type="cosine",
        weight_decay=args.weight_decay, adam_beta2=0.95, max_grad_norm=1.0, bf16=args.precision == "bf16",
        logging_steps=25, save_steps=args.save_steps, save_total_limit=2, seed=args.seed, data_seed=args.seed,
        dataloader_num_workers=args.workers, remove_unused_columns=False, report_to="none",
        disable_tqdm=False,
    )
    collator = BlockDiffusionCollator(BLOCK_SIZE, mask_id, tokenizer.pad_token_id)
    trainer = BlockDiffusionTrainer(model=model, args=training_args, train_dataset=train_set,
                                    data_collator=collator, block_size=BLOCK_SIZE)
    started = time.time()
    if args.time_limit_minutes is not None:
        trainer.add_callback(TimeLimit(started + 60 * args.time_limit_minutes))
    trainer.train(resume_from_checkpoint=get_last_checkpoint(args.output_dir))
    logger.info("training took %.1f s", time.time() - started)
    stopped_early = trainer.state.global_step < args.max_steps

    export = os.path.join(args.output_dir, "model")
    trainer.model.config.use_cache = True  # the Trainer turns it off for training
    trainer.model.generation_config = generation_defaults(tokenizer)  # saved with the weights
    save_hub_checkpoint(trainer.model.float(), export, bd_size=BLOCK_SIZE, tokenizer=tokenizer,
                        dtype=getattr(torch, args.save_dtype), max_shard_size=args.max_shard_size)
    history = [e for e in trainer.state.log_history if "loss" in e]
    with open(os.path.join(args.output_dir, "loss_log.json"), "w", encoding="utf-8") as f:
        json.dump({"args": vars(args), "versions": versions(), "history": history}, f, indent=1)
    plot_loss(history, os.path.join(args.output_dir, "loss_curve.png"), title="demo model: training loss",
              ylabel="block-diffusion loss")
    if stopped_early:
        logger.warning("stopped at step %d of %d (time limit): the model in %s is a partial one; rerun the same "
                       "command to resume", trainer.state.global_step, args.max_steps, export)
        return 3
    return 0


def generation_defaults(tokenizer):
    """Greedy block-diffusion defaults, as `load_model` and `generate` read them."""
    from transformers import GenerationConfig

    return GenerationConfig(
        do_sample=False, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.pad_token_id, max_new_tokens=256,
    )


if __name__ == "__main__":
    sys.exit(main())
