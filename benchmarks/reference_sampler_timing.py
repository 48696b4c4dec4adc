#!/usr/bin/env python
"""Time the reference Fast-dLLM v2 sampler on the throughput benchmark's workload; write a --reference-json file.

The reference sampler is the checkpoint's own remote code (`modeling.py`, `configuration.py`, which need
transformers 4.53 and einops) driven by Fast-dLLM's `v2/generation_functions.py` (`batch_sample`, as its
lm-eval adapter `v2/eval.py` calls it). So this script runs in an environment of its own, on the card the
benchmark runs on, and imports nothing from this library. Its output is the file that
`benchmarks/throughput.py --reference-json` reads (format: benchmarks/reference_sampler.py).

The workload is benchmarks/throughput.py's `random` one: random weights of the config's shape (every
matrix normal with std 0.02, norms 1, the lm_head rows of the stop ids zeroed so that no row ends early),
the same random prompts (same seeds, lengths and tokens; right-padded with the mask token, as the reference's
adapter pads them), 256 new tokens, block 32, sub-block 8, threshold 0.9, bf16 under autocast as in the
adapter. A `batch_sample` with a `reuse_k` argument (the layer-reuse experiment's) gets `reuse_k=1`: no reuse.

tok/s counts, over the wall time of one call, each row's new tokens up to --new-tokens. The sampler decodes
whole blocks: --new-tokens / block-size blocks past the longest prompt's last full block, so that row gets up to
31 tokens fewer than asked and rows with shorter prompts get more. Tokens past the ask are reported
(`generated_tokens`) but not counted, as a user asking for 256 tokens reads at most 256.

    python -m venv reference-env && . reference-env/bin/activate
    pip install torch "transformers==4.53.1" einops
    # DIR: the checkpoint's files (config.json, configuration.py, modeling.py); the weights are not read.
    python benchmarks/reference_sampler_timing.py --model-dir DIR \\
        --generation-functions Fast-dLLM/v2/generation_functions.py --batch-sizes 1,32 --json-out reference.json
"""

from __future__ import annotations

import argparse
import datetime as _dt
import hashlib
import importlib.util
import inspect
import json
import os
import platform
import statistics
import sys
import time
import types
from pathlib import Path


def _load_workload():
    """benchmarks/workload.py (the benchmark's prompts and token ids; it needs only torch), loaded from its file
    under the name benchmarks/throughput.py gives it, as benchmarks/ is a folder of scripts, not a package."""
    if "benchmarks_workload" not in sys.modules:
        spec = importlib.util.spec_from_file_location("benchmarks_workload", Path(__file__).resolve().with_name("workload.py"))
        module = importlib.util.module_from_spec(spec)
        sys.modules["benchmarks_workload"] = module  # before running it: dataclasses look their module up there
        spec.loader.exec_module(module)
    return sys.modules["benchmarks_workload"]


workload = _load_workload()
MASK_ID, EOS_ID, PAD_ID = workload.MASK_ID, workload.EOS_ID, workload.PAD_ID
STOP_IDS = (EOS_ID, PAD_ID)
INIT_STD = 0.02  # benchmarks/throughput.py's default --init-std
MODEL_FILES = ("config.json", "configuration.py", "modeling.py")
CACHE_VALUES = {"on": True, "off": False}


class OneLineParser(argparse.ArgumentParser):
    """Bad arguments end with one line naming the option and the allowed values, and exit 2."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message}\n")


def _csv(value: str) -> list[str]:
    return [v for v in value.split(",") if v]


def parse_args(argv=None) -> argparse.Namespace:
    p = OneLineParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--model-dir", required=True,
                   help="the checkpoint's folder with config.json, configuration.py and modeling.py (weights not read)")
    p.add_argument("--generation-functions", required=True,
                   help="Fast-dLLM's v2/generation_functions.py, which defines Fast_dLLM_QwenForCausalLM.batch_sample")
    p.add_argument("--batch-sizes", default="1,32")
    p.add_argument("--cache", default="on", help="block cache settings to time: a comma list of on, off")
    p.add_argument("--new-tokens", type=int, default=256, help="a multiple of --block-size, as the sampler needs")
    p.add_argument("--prompt-min", type=int, default=96)
    p.add_argument("--prompt-max", type=int, default=160)
    p.add_argument("--block-size", type=int, default=32)
    p.add_argument("--small-block-size", type=int, default=8)
    p.add_argument("--threshold", type=float, default=0.9)
    p.add_argument("--repeats", type=int, default=3, help="timed calls per (batch, cache) after one untimed; the median counts")
    p.add_argument("--seed", type=int, default=0, help="benchmarks/throughput.py's --seed: the same prompts")
    p.add_argument("--device", default="cuda")
    p.add_argument("--dtype", default=None, choices=("bfloat16", "float16", "float32"),
                   help="default: bfloat16 on CUDA, float32 on the CPU")
    p.add_argument("--layers", type=int, default=None, help="fewer decoder layers than the config (smoke runs only)")
    p.add_argument("--json-out", required=True, help="written after every (batch, cache), atomically")
    args = p.parse_args(argv)
    validate_args(args, p)
    return args


def validate_args(args, p) -> None:
    """Every check that needs no model, before transformers is imported."""
    missing = [name for name in MODEL_FILES if not (Path(args.model_dir) / name).is_file()]
    if missing:
        p.error(f"--model-dir {args.model_dir} lacks {', '.join(missing)} (needs {', '.join(MODEL_FILES)})")
    if not Path(args.generation_functions).is_file():
        p.error(f"--generation-functions {args.generation_functions}: no such file")
    try:
        args.batch_sizes = [int(v) for v in _csv(args.batch_sizes)]
    except ValueError:
        p.error(f"--batch-sizes must be a comma list of positive integers, got {args.batch_sizes!r}")
    if not args.batch_sizes or min(args.batch_sizes) <= 0:
        p.error(f"--batch-sizes must be a comma list of positive integers, got {args.batch_sizes!r}")
    caches = _csv(args.cache)
    if not caches or any(c not in CACHE_VALUES for c in caches):
        p.error(f"--cache must be a comma list of {list(CACHE_VALUES)}, got {args.cache!r}")
    args.cache = caches
    for option in ("block_size", "small_block_size", "repeats", "prompt_min"):
        if getattr(args, option) <= 0:
            p.error(f"--{option.replace('_', '-')} must be positive, got {getattr(args, option)}")
    if args.block_size % args.small_block_size:
        p.error(f"--small-block-size must divide --block-size ({args.block_size}), got {args.small_block_size}")
    if args.new_tokens <= 0 or args.new_tokens % args.block_size:
        p.error(f"--new-tokens must be a positive multiple of --block-size ({args.block_size}), got {args.new_tokens}")
    if args.prompt_max < args.prompt_min:
        p.error(f"--prompt-max must be at least --prompt-min ({args.prompt_min}), got {args.prompt_max}")
    if not 0.0 <= args.threshold <= 1.0:
        p.error(f"--threshold must be in [0, 1], got {args.threshold}")
    if args.layers is not None and args.layers <= 0:
        p.error(f"--layers must be positive, got {args.layers}")
    import torch

    if not (args.device == "cpu" or args.device.split(":")[0] == "cuda"):
        p.error(f"--device must be cpu, cuda or cuda:N, got {args.device!r}")
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        p.error(f"--device {args.device}: CUDA is not available here (use --device cpu for a smoke run)")
    args.dtype = args.dtype or ("bfloat16" if args.device.startswith("cuda") else "float32")


def _sha256(path: str) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def build_reference_model(args):
    """The checkpoint's own model class from its remote code, with the benchmark's random weights."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(args.model_dir, trust_remote_code=True)
    if args.layers is not None:
        config.num_hidden_layers = args.layers
        config.layer_types = config.layer_types[: args.layers]
    dtype = getattr(torch, args.dtype)
    with torch.device(args.device):
        model = AutoModelForCausalLM.from_config(config, trust_remote_code=True, torch_dtype=dtype)
    gen = torch.Generator(device=args.device).manual_seed(args.seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "norm" in name:
                param.fill_(1.0)
            else:
                param.normal_(0.0, INIT_STD, generator=gen)
        model.lm_head.weight[list(STOP_IDS)] = 0.0
    return model.eval(), config


def load_sampler(path: str):
    """Fast-dLLM's batch_sample (unbound) and the extra arguments it needs here; loaded before any model is built."""
    spec = importlib.util.spec_from_file_location("fast_dllm_generation_functions", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    sampler = getattr(getattr(module, "Fast_dLLM_QwenForCausalLM", None), "batch_sample", None)
    if sampler is None:
        print(f"{Path(sys.argv[0]).name}: error: --generation-functions {path} defines no "
              "Fast_dLLM_QwenForCausalLM.batch_sample", file=sys.stderr)
        raise SystemExit(2)
    extra = {"reuse_k": 1} if "reuse_k" in inspect.signature(sampler).parameters else {}
    return sampler, extra


def time_batch(model, sampler, extra: dict, args, batch: int, cache: bool, vocab_high: int) -> dict:
    import torch

    prompts = workload.benchmark_prompts(args.seed, batch, args.prompt_min, args.prompt_max, vocab_high)
    lengths = [len(p) for p in prompts]
    width = max(lengths)
    ids = torch.full((batch, width), MASK_ID, dtype=torch.long)
    for row, prompt in enumerate(prompts):
        ids[row, : len(prompt)] = torch.tensor(prompt)
    ids = ids.to(args.device)
    seq_len = torch.tensor(lengths, device=args.device)
    pad = types.SimpleNamespace(pad_token_id=PAD_ID)
    on_cuda = args.device.startswith("cuda")

    def call():
        if on_cuda:
            torch.cuda.synchronize()
        start = time.perf_counter()
        with torch.no_grad(), torch.autocast(device_type="cuda" if on_cuda else "cpu", dtype=getattr(torch, args.dtype),
                                             enabled=on_cuda):
            out = sampler(ids.clone(), tokenizer=pad, block_size=args.block_size, small_block_size=args.small_block_size,
                          max_new_tokens=args.new_tokens, min_len=min(lengths), seq_len=seq_len.clone(),
                          mask_id=MASK_ID, threshold=args.threshold, stop_token=EOS_ID, use_block_cache=cache, **extra)
        if on_cuda:
            torch.cuda.synchronize()
        return out, time.perf_counter() - start

    call()  # untimed: allocator, cuBLAS handles, kernels' first launches
    walls, generated = [], None
    for _ in range(args.repeats):
        out, wall = call()
        walls.append(wall)
        generated = [int(out[row].shape[0]) - lengths[row] for row in range(batch)]
    counted = sum(min(n, args.new_tokens) for n in generated)
    wall = statistics.median(walls)
    return {"batch": batch, "cache": "on" if cache else "off", "workload": "random",
            "tokens_per_second": round(counted / wall, 2), "wall_seconds": round(wall, 6),
            "walls": [round(w, 6) for w in walls], "new_tokens": args.new_tokens, "counted_tokens": counted,
            "generated_tokens": sum(generated), "prompt_lengths": [min(lengths), width]}


def environment(args) -> dict:
    import torch
    import transformers

    gpu = torch.cuda.get_device_name() if args.device.startswith("cuda") else platform.processor() or "cpu"
    return {"gpu": gpu, "torch": torch.__version__, "transformers": transformers.__version__,
            "python": platform.python_version(), "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
            "dtype": args.dtype, "layers": args.layers,
            "sampler": "Fast_dLLM_QwenForCausalLM.batch_sample", "generation_functions_sha256": _sha256(args.generation_functions),
            "modeling_sha256": _sha256(str(Path(args.model_dir) / "modeling.py")),
            "workload": f"random weights (std {INIT_STD}), stop ids' lm_head rows zeroed, prompts "
                        f"{args.prompt_min}-{args.prompt_max} tokens (seed {args.seed}), {args.new_tokens} new tokens, "
                        f"block {args.block_size}, sub-block {args.small_block_size}, threshold {args.threshold}",
            "command": " ".join([Path(sys.argv[0]).name] + sys.argv[1:])}


def write_atomically(path: str, data: dict) -> None:
    """The library's `write_text_atomic` for this script, which runs where the library is not installed."""
    tmp = f"{path}.tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(data, f, indent=1)
        f.write("\n")
    os.replace(tmp, path)


def main(argv=None) -> int:
    args = parse_args(argv)
    sampler, extra = load_sampler(args.generation_functions)
    t0 = time.perf_counter()
    model, config = build_reference_model(args)
    sampler = types.MethodType(sampler, model)  # as the reference's adapter binds it
    vocab_high = workload.prompt_vocab_high(int(config.vocab_size))
    results = {"environment": dict(environment(args), model_build_seconds=round(time.perf_counter() - t0, 1)), "runs": []}
    for batch in args.batch_sizes:
        for cache in args.cache:
            run = time_batch(model, sampler, extra, args, batch, CACHE_VALUES[cache], vocab_high)
            results["runs"].append(run)
            write_atomically(args.json_out, results)
            print(f"reference batch {batch} cache {cache}: {run['tokens_per_second']} tok/s "
                  f"(median of {args.repeats}: {run['walls']} s)", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
