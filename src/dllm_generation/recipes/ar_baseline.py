"""Evaluate an autoregressive adapter (a recipe's `--objective autoregressive`) with transformers' own `generate`.

    python -m dllm_generation.recipes.ar_baseline --adapter runs/smol-ar/model --task arith \
        --batch-size 32 --output runs/ar-arith.json

The baseline of the block-diffusion model: same parent, same mixture, same steps. Prompts are rendered
by the eval pipeline's code and scored by its metrics, and tok/s is counted as `dllm-eval` counts it
(generated tokens through the stop token, over the device-synchronised seconds of the `generate`
calls, after one untimed warm-up call), so the two summaries compare field for field.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import sys
import time

import torch

logger = logging.getLogger(__name__)

TASK_BUDGETS = {"arith": 320, "gsm8k": 512}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--adapter", required=True, help="an adapter folder written with --objective autoregressive")
    p.add_argument("--task", choices=sorted(TASK_BUDGETS), required=True)
    p.add_argument("--data-files", default=None, help="JSON Lines with question/answer (default: arith's shipped test set)")
    p.add_argument("--limit", type=int, default=None, help="only the first N rows")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--max-new-tokens", type=int, default=None, help="default: 320 for arith, 512 for gsm8k")
    p.add_argument("--dtype", choices=("float32", "bfloat16"), default=None, help="default: bf16 on CUDA, else float32")
    p.add_argument("--device", default=None)
    p.add_argument("--gguf", default=None, help="the base GGUF file, when it is not the installed wheel's")
    p.add_argument("--output", required=True, help="summary JSON (samples go beside it as .samples.jsonl)")
    args = p.parse_args(argv)
    if args.task == "gsm8k" and args.data_files is None:
        p.error("--task gsm8k needs --data-files (GSM8K test as JSON Lines)")
    if args.batch_size < 1 or (args.limit is not None and args.limit < 1):
        p.error("--batch-size and --limit must be >= 1")
    return args


def read_rows(args) -> list[dict]:
    from ..arith.data import test_set_path

    with open(args.data_files or test_set_path(), encoding="utf-8") as f:
        rows = [json.loads(line) for line in f if line.strip()]
    return rows[: args.limit] if args.limit else rows


def main(argv=None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    from ..eval.artifacts import write_json_atomic, write_jsonl_atomic
    from ..eval.metrics import aggregate, score_sample
    from ..eval.prompts import build_prompt, render_prompt
    from ..training.reporting import versions
    from .adapter_model import load_adapter_model, read_manifest

    objective = read_manifest(args.adapter).get("objective")
    if objective != "autoregressive":
        raise SystemExit(f"--adapter {args.adapter}: objective={objective!r}; this baseline takes "
                         "objective='autoregressive' adapters (block-diffusion ones run through dllm-eval)")
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    dtype = getattr(torch, args.dtype or ("bfloat16" if device.type == "cuda" else "float32"))
    rows = read_rows(args)
    model, tokenizer = load_adapter_model(args.adapter, gguf=args.gguf, dtype=dtype, device=device)
    tokenizer.padding_side = "left"
    budget = args.max_new_tokens or TASK_BUDGETS[args.task]
    eos, pad = tokenizer.eos_token_id, tokenizer.pad_token_id
    prompts = [render_prompt(tokenizer, build_prompt(args.task, row, {}), chat_template=True) for row in rows]

    def generate(batch_prompts, max_new_tokens):
        longest = max(len(p) for p in batch_prompts)
        ids = torch.full((len(batch_prompts), longest), pad, dtype=torch.long)
        attention = torch.zeros_like(ids)
        for i, p in enumerate(batch_prompts):
            ids[i, longest - len(p):] = torch.tensor(p)
            attention[i, longest - len(p):] = 1
        with torch.no_grad():
            out = model.generate(input_ids=ids.to(device), attention_mask=attention.to(device), do_sample=False,
                                 max_new_tokens=max_new_tokens, eos_token_id=eos, pad_token_id=pad)
        return out[:, longest:].tolist()

    generate(prompts[: args.batch_size], 16)  # warm-up, untimed
    samples, seconds, tokens = [], 0.0, 0
    for start in range(0, len(rows), args.batch_size):
        batch = prompts[start: start + args.batch_size]
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        began = time.perf_counter()
        outputs = generate(batch, budget)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        seconds += time.perf_counter() - began
        for offset, generated in enumerate(outputs):
            kept = generated[: generated.index(eos) + 1] if eos in generated else generated
            kept = [t for t in kept if t != pad or t == eos]
            tokens += len(kept)
            row = rows[start + offset]
            text = tokenizer.decode([t for t in kept if t != eos], skip_special_tokens=True)
            scored = score_sample(args.task, text, row)
            samples.append({"id": row.get("id", start + offset), "prediction": text, "tokens": len(kept),
                            "correct": scored["correct"], "metrics": scored["metrics"]})
        logger.info("%d / %d rows", len(samples), len(rows))
    metrics = aggregate(args.task, [s["metrics"] for s in samples])
    n = len(samples)
    stderr = {name: math.sqrt(value * (1 - value) / (n - 1)) if n > 1 else None for name, value in metrics.items()}
    summary = {"task": args.task, "adapter": args.adapter, "decoder": "transformers generate (greedy, KV cache)",
               "rows": n, "batch_size": args.batch_size, "max_new_tokens": budget, "dtype": str(dtype),
               "metrics": metrics, "stderr": stderr, "tokens": tokens, "wall_seconds": round(seconds, 4),
               "tokens_per_second": round(tokens / seconds, 2), "tokens_per_forward": 1.0,
               "versions": versions()}
    write_jsonl_atomic(args.output.removesuffix(".json") + ".samples.jsonl", samples)
    write_json_atomic(args.output, summary)
    logger.info("%s: %s; %.1f tok/s", args.task, metrics, summary["tokens_per_second"])
    return 0


if __name__ == "__main__":
    sys.exit(main())
