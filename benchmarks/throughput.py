#!/usr/bin/env python
"""Decoding throughput on a fixed workload: random weights of a checkpoint's shape.

Workload: random weights of the checkpoint's exact shape (default: Fast_dLLM_v2_7B's config.json),
bf16, SDPA; prompts of 96-160 random tokens; 256 new tokens; block 32, sub-block 8, threshold
0.9. Grid: batch sizes x block cache on/off x (no layer reuse, k in {1,2,3} x {first, middle, last},
or unmask-drift tolerances) x engine (`--fast-path`: on, compile, graphs, uncaptured, off = the eager
engine), under one or both workloads:

* `--workload random`: the weights as built. Every step unmasks exactly one token per row.
* `--workload target`: a trained model unmasks several tokens per step (Fast_dLLM_v2_7B reports
  about 2-3 per forward on GSM8K). The final norm's weight is scaled by a factor alpha, found by
  bisection on a batch-1 calibration decode, so that tokens per forward hits `--target-tpf`; the
  lm_head rows of the stop ids are zeroed so that no row stops early. The decoding rule and the
  kernels are the real ones; only how many tokens clear the threshold per step changes
  (benchmarks/workload.py says how and why).

Warm-up runs (same prompts, so every CUDA graph a timed run needs exists) are excluded from the
timings. In the same process, on the same device and weights, it also measures the weights-stream
floor (the time to read every weight once; `xfloor` = ms per forward / floor) and the
autoregressive alternative: transformers' own `generate`, greedy, static cache (compiled by
transformers on CUDA), the same prompts, exactly `--new-tokens` tokens (benchmarks/baselines.py).

Prints one table: tokens/s, tokens per forward, ms per forward (wall / forwards), its multiple of
the floor, forwards, layer executions, speedup over our own run without layer reuse (same workload,
batch, cache, path), its bound from the counted layer executions (executions without reuse /
executions at this config) and the share of the bound reached, the ratio to the eager engine, to the
autoregressive baseline at the same batch and, with `--reference-json`, to the reference sampler
(benchmarks/reference_sampler.py gives the file format), and the token agreement between the graphed
and the eager engine. Exits 1 if any run failed; bad arguments end with one line and exit 2 before any model
is built.

    hf download Efficient-Large-Model/Fast_dLLM_v2_7B config.json --local-dir fast_dllm_v2_7b
    python benchmarks/throughput.py --config fast_dllm_v2_7b/config.json --json-out results.json
    python benchmarks/throughput.py --tiny          # CPU smoke run: tiny config, small grid (seconds to a minute)
"""

from __future__ import annotations

import argparse
import datetime as _dt
import importlib.util
import json
import math
import os
import platform
import sys
import time
import traceback
from pathlib import Path

import torch

from dllm_generation.eval.artifacts import write_text_atomic
from dllm_generation.eval.cli import parse_size



def _load_sibling(name: str):
    """A measurement module beside this script. benchmarks/ is a folder of scripts, not a package, so the
    module is loaded from its file (as the tests load this script), not through an edited import path."""
    qualified = f"benchmarks_{name}"
    if qualified not in sys.modules:
        spec = importlib.util.spec_from_file_location(qualified, Path(__file__).resolve().with_name(f"{name}.py"))
        module = importlib.util.module_from_spec(spec)
        sys.modules[qualified] = module  # before running it: dataclasses look their module up there
        spec.loader.exec_module(module)
    return sys.modules[qualified]


baselines = _load_sibling("baselines")  # the weights-stream floor and the autoregressive baseline
workload = _load_sibling("workload")  # the random and target workloads, alpha's calibration
reference_sampler = _load_sibling("reference_sampler")  # the reference sampler's tok/s file
throughput_table = _load_sibling("throughput_table")  # the printed table
ArMode, Workload, WORKLOAD_CHOICES = baselines.ArMode, workload.Workload, workload.WORKLOAD_CHOICES
render_table, fast_path_mode = throughput_table.render_table, throughput_table.fast_path_mode

# Without --config: the Fast_dLLM_v2_7B config.json in the data folder beside the repository, if present.
DEFAULT_CONFIG = os.path.join(os.path.dirname(__file__), "..", "..", "shared", "data", "fast_dllm_v2_7b", "config.json")
MASK_ID, EOS_ID, PAD_ID = workload.MASK_ID, workload.EOS_ID, workload.PAD_ID
TINY = dict(num_hidden_layers=4, hidden_size=64, intermediate_size=128, num_attention_heads=4,
            num_key_value_heads=2, vocab_size=512, max_position_embeddings=2048)
# --tiny's grid, for every option left unset: small enough for a CPU in about a minute.
TINY_GRID = dict(batch_sizes="1,3", new_tokens=40, k="2", subsets="first,last", cache="on,off",
                 fast_path="uncaptured,off", warmup="short", ar=ArMode.EAGER.value,
                 init_std=0.02 * math.sqrt(3584 / TINY["hidden_size"]))
FULL_GRID = dict(batch_sizes="1,8,32", new_tokens=256, k="1,2,3", subsets="first,middle,last", cache="on,off",
                 fast_path="on,off", warmup="full", ar=ArMode.STATIC.value, init_std=0.02)
# The tiny model's std keeps std x sqrt(hidden) at the 7B's value (0.02 x sqrt(3584)), so its activations and
# attention scores have the 7B's per-element scale. At std 0.02 a 64-wide model's attention is almost uniform:
# every masked position then sees the same context, all clear the threshold at the same alpha, and the target
# workload's tokens per forward jumps from 1 to a whole sub-block instead of rising with alpha.
POLICY_FIXED, POLICY_DRIFT = "fixed", "unmask_drift"  # LayerReuseConfig.policy values the grid can run
CACHE_VALUES = ("on", "off")


def _csv(value, cast=str):
    return [cast(v) for v in str(value).split(",") if v != ""]


class OneLineParser(argparse.ArgumentParser):
    """Bad arguments end with one line naming the option and the allowed values, and exit 2."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message}\n")


def parse_args(argv=None):
    p = OneLineParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--config", default=None,
                   help="the checkpoint's config.json giving the model shape (default: ../shared/data/fast_dllm_v2_7b/ "
                        "beside the repository)")
    p.add_argument("--tiny", action="store_true",
                   help=f"CPU smoke run: tiny config, float32, and unless given otherwise the grid {TINY_GRID}")
    p.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    p.add_argument("--dtype", default=None, help="default: bfloat16 on CUDA, float32 on CPU")
    p.add_argument("--batch-sizes", default=None, help=f"default: {FULL_GRID['batch_sizes']}")
    p.add_argument("--new-tokens", type=int, default=None, help=f"default: {FULL_GRID['new_tokens']}")
    p.add_argument("--prompt-min", type=int, default=96)
    p.add_argument("--prompt-max", type=int, default=160)
    p.add_argument("--block-size", type=int, default=32)
    p.add_argument("--small-block-size", type=int, default=8)
    p.add_argument("--threshold", type=float, default=0.9)
    p.add_argument("--cache", default=None, help=f"block cache settings to run (default: {FULL_GRID['cache']})")
    p.add_argument("--workload", default="random", choices=tuple(WORKLOAD_CHOICES),
                   help="random: the weights as built (one token per step); target: logits scaled so that a batch-1 "
                        "decode unmasks --target-tpf tokens per forward; both: the grid under each")
    p.add_argument("--target-tpf", type=float, default=2.5,
                   help="tokens per forward the target workload is calibrated to (batch 1, block cache on, no reuse)")
    p.add_argument("--calibration-tokens", type=int, default=64, help="new tokens of each calibration decode")
    p.add_argument("--policy", default=POLICY_FIXED,
                   help=f"comma list of reuse policies: {POLICY_FIXED} (recompute every k steps: --k) and/or "
                        f"{POLICY_DRIFT} (recompute once more than --tolerance of the sub-block was unmasked)")
    p.add_argument("--k", default=None, help=f"layer-reuse k values of the fixed policy (default: {FULL_GRID['k']})")
    p.add_argument("--tolerance", default=None, help=f"comma list of {POLICY_DRIFT} tolerances in [0, 1]")
    p.add_argument("--max-staleness", type=int, default=None, help=f"{POLICY_DRIFT}: recompute an entry this many steps old")
    p.add_argument("--subsets", default=None, help=f"default: {FULL_GRID['subsets']}")
    p.add_argument("--reuse-size", type=parse_size, default=None,
                   help="layers in the reuse subset: a count (12) or a share of the layers (0.5); default: "
                        "LayerReuseConfig's, 12 of 28 layers as a share")
    p.add_argument("--no-baseline", action="store_true", help="skip the layer_reuse=None runs")
    p.add_argument("--only", default="",
                   help="comma list of BATCH:CACHE:REUSE items (e.g. 32:on:k3-first, '*' matches anything): for the "
                        "batch sizes named there, run only the matching configs")
    p.add_argument("--fast-path", default=None,
                   help=f"paths to run: on (default fast path), off (eager engine), uncaptured, graphs, compile (default: "
                        f"{FULL_GRID['fast_path']})")
    p.add_argument("--plain-grid", choices=("all", "baseline", "none"), default="all",
                   help="which reuse settings the eager engine (off) runs: all, only layer_reuse=None, none")
    p.add_argument("--plain-batch-sizes", default=None, help="batch sizes for the eager engine (off) (default: --batch-sizes)")
    p.add_argument("--repeats", type=int, default=1, help="timed runs per config (the median is reported)")
    p.add_argument("--warmup", choices=("full", "short", "none"), default=None,
                   help="full: one untimed run of the same workload before timing; short: 2 blocks, for the paths "
                        "that capture no graphs (off, uncaptured). A path that captures always warms up at full "
                        "length: a shorter run sizes its static buffers below the timed run's, which would then "
                        "capture every pass again inside the timing (default: full)")
    p.add_argument("--no-floor", action="store_true", help="skip the weights-stream floor (and the xfloor column)")
    p.add_argument("--floor-repeats", type=int, default=5, help="timed reads of the floor buffer (the best is kept)")
    p.add_argument("--ar", default=None, choices=tuple(m.value for m in ArMode),
                   help="autoregressive baseline (transformers' generate): static (static cache, compiled by "
                        "transformers on CUDA), eager (dynamic cache, no compile), off (default: static; --tiny: eager)")
    p.add_argument("--ar-batch-sizes", default=None,
                   help="batch sizes of the autoregressive baseline (default: --batch-sizes); each new batch size "
                        "costs a compile on CUDA")
    p.add_argument("--reference-json", default=None,
                   help="tok/s of the reference Fast-dLLM v2 sampler per (batch, cache), measured in another process "
                        "(format: benchmarks/reference_sampler.py); adds the 'vs ref' column")
    p.add_argument("--init-std", type=float, default=None,
                   help=f"std of the random weights (default: {FULL_GRID['init_std']}; --tiny: {TINY_GRID['init_std']:.3g})")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json-out", default=None, help="write all results (and environment) here, updated after every run")
    p.add_argument("--profile", default=None,
                   help="comma list of paths (off,on,...) to profile (torch.profiler; it does not trace the kernels "
                        "of a device loop's later iterations, so repeated steps are undercounted)")
    p.add_argument("--profile-tokens", type=int, default=64)
    p.add_argument("--profile-batch", type=int, default=1, help="batch size of the profiled decode")
    p.add_argument("--agreement", action="store_true",
                   help="also check fast vs plain tokens on a shallow model with peaky random weights (decisive logits)")
    p.add_argument("--graph-check", default=None,
                   help="comma list of batch sizes: on the benchmark model, compare the fast path with CUDA graphs "
                        "(graphs) against the same passes run without capture (uncaptured), block cache on, k2-first, 64 new tokens: "
                        "identical kernels, so tokens must agree exactly")
    p.add_argument("--time-budget", type=float, default=None, help="stop starting new runs after this many seconds")
    args = p.parse_args(argv)
    for name, value in (TINY_GRID if args.tiny else FULL_GRID).items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    if args.tiny:
        args.device = args.device or "cpu"
        args.dtype = args.dtype or "float32"
    args.device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    args.dtype = args.dtype or ("bfloat16" if args.device.startswith("cuda") else "float32")
    validate_args(args, p)
    return args


def _positive_ints(p, option: str, value) -> list[int]:
    try:
        values = _csv(value, int)
    except ValueError:
        p.error(f"{option} must be a comma list of positive integers, got {value!r}")
    if not values or any(v <= 0 for v in values):
        p.error(f"{option} must be a comma list of positive integers, got {value!r}")
    return values


def validate_args(args, p) -> None:
    """Every grid option, checked before any model is built; `p.error` prints one line and exits 2."""
    for option, value in (("--batch-sizes", args.batch_sizes), ("--k", args.k)):
        _positive_ints(p, option, value)
    for option, value in (("--plain-batch-sizes", args.plain_batch_sizes), ("--ar-batch-sizes", args.ar_batch_sizes)):
        if value is not None:
            _positive_ints(p, option, value)
    for option, value in (("--new-tokens", args.new_tokens), ("--calibration-tokens", args.calibration_tokens),
                          ("--floor-repeats", args.floor_repeats), ("--profile-tokens", args.profile_tokens),
                          ("--profile-batch", args.profile_batch)):
        if value <= 0:
            p.error(f"{option} must be a positive integer, got {value}")
    bad = [c for c in _csv(args.cache) if c not in CACHE_VALUES]
    if bad or not _csv(args.cache):
        p.error(f"--cache takes a comma list of {list(CACHE_VALUES)}, got {args.cache!r}")
    bad = [v for v in _csv(args.fast_path) if v not in PATH_VALUES]
    if bad or not _csv(args.fast_path):
        p.error(f"--fast-path takes a comma list of {list(PATH_VALUES)}, got {args.fast_path!r}")
    policies = _csv(args.policy)
    bad = [v for v in policies if v not in (POLICY_FIXED, POLICY_DRIFT)]
    if bad or not policies:
        p.error(f"--policy takes a comma list of {[POLICY_FIXED, POLICY_DRIFT]}, got {args.policy!r}")
    if args.tolerance is not None:
        try:
            tolerances = _csv(args.tolerance, float)
        except ValueError:
            tolerances = []
        if not tolerances or any(not 0.0 <= t <= 1.0 for t in tolerances):
            p.error(f"--tolerance takes a comma list of numbers in [0, 1] (a share of the sub-block), got {args.tolerance!r}")
    if args.max_staleness is not None and args.max_staleness < 1:
        p.error(f"--max-staleness must be an integer >= 1 (steps), got {args.max_staleness}")
    if POLICY_DRIFT in policies and args.tolerance is None:
        p.error(f"--policy {POLICY_DRIFT} needs --tolerance (a comma list of numbers in [0, 1])")
    if POLICY_DRIFT not in policies and (args.tolerance is not None or args.max_staleness is not None):
        p.error(f"--tolerance and --max-staleness apply to --policy {POLICY_DRIFT} only (got --policy {args.policy})")
    if not 1.0 < args.target_tpf <= args.small_block_size:
        p.error(f"--target-tpf must be a number in (1, {args.small_block_size}] (tokens per forward; a step unmasks at "
                f"most one sub-block of --small-block-size tokens), got {args.target_tpf}")
    try:
        args.reuse_grid = reuse_grid(args)
    except ValueError as err:  # LayerReuseConfig's own validation, e.g. a subset name
        p.error(f"layer-reuse grid (--k/--subsets/--policy/--tolerance/--max-staleness/--reuse-size): {err}")
    args.reference = None
    if args.reference_json is not None:
        try:
            args.reference = reference_sampler.load_reference(args.reference_json, [w.value for w in Workload])
        except reference_sampler.ReferenceFileError as err:
            p.error(str(err))


# ------------------------------------------------------------------------------------------------
def environment(args) -> dict:
    import transformers

    env = {"date": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"), "python": platform.python_version(),
           "torch": torch.__version__, "transformers": transformers.__version__, "device": args.device,
           "dtype": args.dtype}
    if args.device.startswith("cuda"):
        props = torch.cuda.get_device_properties(0)
        env.update(gpu=props.name, gpu_memory_gib=round(props.total_memory / 2**30, 1), sms=props.multi_processor_count,
                   cuda=torch.version.cuda, sdpa_backends={
                       "flash": torch.backends.cuda.flash_sdp_enabled(),
                       "mem_efficient": torch.backends.cuda.mem_efficient_sdp_enabled(),
                       "cudnn": torch.backends.cuda.cudnn_sdp_enabled()})
    else:
        env.update(cpu=platform.processor() or platform.machine(), threads=torch.get_num_threads())
    return env


def load_hub_config(args) -> dict:
    if args.tiny and args.config is None:
        raw = {"model_type": "qwen2", "hidden_act": "silu", "rms_norm_eps": 1e-6, "rope_theta": 1000000.0,
               "tie_word_embeddings": False, "use_sliding_window": False}
    else:
        path = args.config or (DEFAULT_CONFIG if os.path.exists(DEFAULT_CONFIG) else None)
        if path is None or not os.path.exists(path):
            raise SystemExit(f"no config.json at {path or DEFAULT_CONFIG}; pass --config with the checkpoint's config.json")
        with open(path, encoding="utf-8") as f:
            raw = json.load(f)
    if args.tiny:
        raw = dict(raw, **TINY, layer_types=["full_attention"] * TINY["num_hidden_layers"],
                   max_window_layers=TINY["num_hidden_layers"])
    return raw


def build_model(raw: dict, args, *, num_layers: int | None = None, peaky: bool = False):
    """Random weights of the config's shape, built directly on the device (nothing on disk)."""
    from dllm_generation.loading import config_from_hub_dict
    from dllm_generation.testing import init_random_weights

    raw = dict(raw)
    if num_layers is not None:
        raw.update(num_hidden_layers=num_layers, layer_types=["full_attention"] * num_layers, max_window_layers=num_layers)
    cfg, cls = config_from_hub_dict(raw)
    cfg._attn_implementation = "sdpa"
    dtype = getattr(torch, args.dtype)
    old = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(args.device):
            model = cls(cfg)
    finally:
        torch.set_default_dtype(old)
    gen = torch.Generator(device=args.device).manual_seed(args.seed + (1 if peaky else 0))
    if peaky:  # as testing.make_tiny_checkpoint: decisive logits, so tokens are robust to rounding
        init_random_weights(model, std=0.5, generator=gen)
    else:
        init_random_weights(model, std=args.init_std, fan_in_scaled=False, generator=gen)
    model.eval()
    vocab = cfg.vocab_size
    gc = model.generation_config
    if vocab > MASK_ID:
        gc.mask_token_id, gc.eos_token_id, gc.pad_token_id = MASK_ID, EOS_ID, PAD_ID
    else:
        gc.mask_token_id, gc.eos_token_id, gc.pad_token_id = vocab - 1, vocab - 2, vocab - 3
    if not peaky:  # fixed work: no row of the benchmark ends early (the agreement check keeps stop tokens)
        workload.exclude_stop_tokens(model)
    return model


def make_prompts(args, batch: int, vocab_high: int, seed_offset: int = 0):
    """The batch's prompts (workload.benchmark_prompts), left-padded, and their attention mask."""
    prompts = workload.benchmark_prompts(args.seed, batch, args.prompt_min, args.prompt_max, vocab_high, seed_offset)
    width = max(len(p) for p in prompts)
    ids = torch.zeros((batch, width), dtype=torch.long)
    mask = torch.zeros_like(ids)
    for r, p in enumerate(prompts):
        ids[r, width - len(p):] = torch.tensor(p)
        mask[r, width - len(p):] = 1
    return ids.to(args.device), mask.to(args.device)


# --fast-path values: the GenerationConfig.fast_path each one sets (on: the default, graphs where they apply).
PATH_VALUES = {"on": None, "off": False, "uncaptured": "uncaptured", "graphs": "graphs", "compile": "compile"}


def gen_config(args, *, cache: bool, reuse, path: str, new_tokens: int):
    from transformers import GenerationConfig

    return GenerationConfig(max_new_tokens=new_tokens, block_size=args.block_size, small_block_size=args.small_block_size,
                            threshold=args.threshold, use_block_cache=cache, layer_reuse=reuse,
                            fast_path=PATH_VALUES[path], do_sample=False)


def _sync(args):
    if args.device.startswith("cuda"):
        torch.cuda.synchronize()


def run_one(model, args, ids, mask, *, cache: bool, reuse, path: str, new_tokens: int):
    cfg = gen_config(args, cache=cache, reuse=reuse, path=path, new_tokens=new_tokens)
    _sync(args)
    t0 = time.perf_counter()
    out = model.generate(input_ids=ids, attention_mask=mask, generation_config=cfg, return_dict_in_generate=True)
    _sync(args)
    wall = time.perf_counter() - t0
    return out.sequences[:, ids.shape[1]:].cpu(), out.stats, wall


def reuse_grid(args):
    """(label, LayerReuseConfig or None) per reuse cell: fixed k x subsets, then drift tolerances x subsets."""
    from dllm_generation import LayerReuseConfig

    grid = [] if args.no_baseline else [("none", None)]
    policies = _csv(args.policy)
    if POLICY_FIXED in policies:
        for k in _csv(args.k, int):
            for subset in _csv(args.subsets):
                grid.append((f"k{k}-{subset}", LayerReuseConfig(k=k, subset=subset, **_size_kwarg(args))))
    if POLICY_DRIFT in policies:
        stale = "" if args.max_staleness is None else f"-s{args.max_staleness}"
        for tolerance in _csv(args.tolerance, float):
            for subset in _csv(args.subsets):
                grid.append((f"drift{tolerance:g}{stale}-{subset}",
                             LayerReuseConfig(k=1, subset=subset, policy=POLICY_DRIFT, tolerance=tolerance,
                                              max_staleness=args.max_staleness, **_size_kwarg(args))))
    return grid


def _size_kwarg(args) -> dict:
    return {} if args.reuse_size is None else {"size": args.reuse_size}


def selected(args, batch: int, cache: bool, label: str) -> bool:
    items = [tuple(i.split(":")) for i in _csv(args.only)]
    mine = [i for i in items if i[0] in (str(batch), "*")]
    if not mine:
        return True
    return any(c in ("*", "on" if cache else "off") and r in ("*", label) for _, c, r in mine)


def agreement(a: torch.Tensor, b: torch.Tensor) -> dict:
    equal = (a == b)
    first = []
    for row in equal.tolist():
        first.append(row.index(False) if False in row else len(row))
    return {"token_agreement": round(equal.float().mean().item(), 4),
            "rows_identical": int(sum(all(r) for r in equal.tolist())), "rows": int(a.shape[0]),
            "mean_first_divergence": round(sum(first) / len(first), 1)}


# ------------------------------------------------------------------------------------------------
def timed_diffusion_run(model, args, ids, mask, *, cache: bool, reuse, path: str, plain_warmed: bool):
    """Warm-up (unless the plain path already ran at this batch: it has nothing to capture), then the timed
    runs; returns the record and the last run's tokens."""
    warm = 0.0
    batch = ids.shape[0]
    if args.warmup != "none" and (path != "off" or not plain_warmed):
        short = path == "off" or (args.warmup == "short" and path == "uncaptured")
        t0 = time.perf_counter()
        run_one(model, args, ids, mask, cache=cache, reuse=reuse, path=path,
                new_tokens=2 * args.block_size if short else args.new_tokens)
        warm = time.perf_counter() - t0
    walls, stats, seq = [], None, None
    for _ in range(max(1, args.repeats)):
        seq, stats, wall = run_one(model, args, ids, mask, cache=cache, reuse=reuse, path=path, new_tokens=args.new_tokens)
        walls.append(wall)
    wall = sorted(walls)[len(walls) // 2]
    rec = {"path": path, "wall_seconds": round(wall, 4), "walls": [round(w, 4) for w in walls],
           "warmup_seconds": round(warm, 2), "generated_tokens": stats["generated_tokens"],
           "full_length": stats["generated_tokens"] == batch * args.new_tokens,
           "tokens_per_second": round(stats["generated_tokens"] / wall, 2),
           "tokens_per_forward": round(stats["tokens_per_forward"], 4),
           "ms_per_forward": round(1000 * wall / stats["forwards"], 3),
           **{k: stats[k] for k in ("forwards", "denoising_steps", "layer_calls", "layer_calls_skipped")},
           **{k: stats.get(k) for k in ("prefill_forwards", "commit_forwards", "block_forwards", "sub_block_forwards")},
           "fast_path": stats.get("fast_path")}  # kept as the library reports it
    captured = rec["fast_path"].get("captures") if isinstance(rec["fast_path"], dict) else 0
    if captured:
        print(f"note: the timed {path} run captured {captured} passes; their first runs are inside its timing",
              flush=True)
    return rec, seq


CALIBRATION_SEED_OFFSET = 11  # the calibration decode's prompt differs from the timed batch-1 prompt


def calibrate_target(model, args, vocab_high: int, weights) -> dict:
    """Find alpha for the target workload on a batch-1 decode (block cache on, no reuse, plain path)."""
    ids, mask = make_prompts(args, 1, vocab_high, seed_offset=CALIBRATION_SEED_OFFSET)
    generated = {}

    def measure(alpha: float) -> float:
        weights.set(Workload.TARGET, alpha)
        _, stats, _ = run_one(model, args, ids, mask, cache=True, reuse=None, path="off", new_tokens=args.calibration_tokens)
        generated[alpha] = stats["generated_tokens"]
        return stats["tokens_per_forward"]

    calibration = workload.calibrate_alpha(measure, args.target_tpf, log=lambda line: print(line, flush=True))
    return {**calibration.as_dict(), "full_length": generated[calibration.alpha] == args.calibration_tokens,
            "decode": {"batch": 1, "cache": "on", "path": "off", "reuse": "none", "new_tokens": args.calibration_tokens,
                       "prompt_tokens": int(mask.sum())},
            "stop_ids_excluded": workload.stop_token_ids(model.generation_config)}


def _jsonable_args(args) -> dict:
    return {k: v for k, v in vars(args).items() if k not in ("reuse_grid", "reference")}


def main(argv=None):
    args = parse_args(argv)
    t_start = time.perf_counter()
    torch.manual_seed(args.seed)
    env = environment(args)
    print("environment:", json.dumps(env), flush=True)
    raw = load_hub_config(args)
    t0 = time.perf_counter()
    model = build_model(raw, args)
    vocab_high = workload.prompt_vocab_high(int(raw["vocab_size"]))
    env["model_build_seconds"] = round(time.perf_counter() - t0, 1)
    env["model"] = {k: raw.get(k) for k in ("num_hidden_layers", "hidden_size", "intermediate_size", "num_attention_heads",
                                            "num_key_value_heads", "vocab_size")}
    env["params_billion"] = round(sum(p.numel() for p in model.parameters()) / 1e9, 3)
    print(f"model: {env['model']} ({env['params_billion']} B params) built in {env['model_build_seconds']} s", flush=True)
    results: dict = {"environment": env, "args": _jsonable_args(args), "runs": [], "autoregressive": [], "errors": [],
                     "profiles": {}, "agreement_check": []}
    if args.reference is not None:
        results["reference"] = args.reference

    def save():
        if args.json_out:
            write_text_atomic(args.json_out, json.dumps(results, indent=1))

    def out_of_time():
        return args.time_budget is not None and time.perf_counter() - t_start > args.time_budget

    def failed(name: str, err: Exception):
        results["errors"].append({"run": name, "error": f"{type(err).__name__}: {err}",
                                  "traceback": traceback.format_exc()[-3000:]})
        print(f"{name}: FAILED {type(err).__name__}: {err}", flush=True)
        if args.device.startswith("cuda"):
            torch.cuda.synchronize()
            torch.cuda.empty_cache()

    if not args.no_floor:
        try:
            env["weights_floor"] = floor = baselines.weights_stream_floor(model, repeats=args.floor_repeats)
            print(f"weights-stream floor: {floor['gigabytes']} GB read in {floor['ms']} ms ({floor['gb_per_second']} GB/s, "
                  f"{floor['reduction']}, best of {floor['repeats']})", flush=True)
        except Exception as err:  # the grid still runs; its table lacks the xfloor column
            failed("weights-stream floor", err)
        save()

    workloads = list(WORKLOAD_CHOICES[args.workload])
    weights = workload.WorkloadWeights(model)
    alpha = 1.0
    if Workload.TARGET in workloads:
        try:
            results["workload"] = cal = calibrate_target(model, args, vocab_high, weights)
            print(f"target workload: alpha {cal['alpha']:.4g} gives {cal['tokens_per_forward']:.3f} tokens/forward "
                  f"(target {args.target_tpf}, batch 1, {args.calibration_tokens} new tokens); full length: "
                  f"{cal['full_length']}", flush=True)
            if not (cal["within_tolerance"] and cal["full_length"]):
                raise RuntimeError(f"calibration missed: {cal['tokens_per_forward']:.3f} tokens/forward for target "
                                   f"{args.target_tpf} (+-{cal['tolerance']:.0%}), full length {cal['full_length']}")
            alpha = cal["alpha"]
        except Exception as err:  # no target rows rather than mislabelled ones
            failed("target workload calibration", err)
            workloads.remove(Workload.TARGET)
        weights.set(Workload.RANDOM)
        save()

    paths = _csv(args.fast_path)
    batches = _csv(args.batch_sizes, int)
    plain_batches = _csv(args.plain_batch_sizes, int) if args.plain_batch_sizes else batches
    caches = [c == "on" for c in _csv(args.cache)]
    grid = args.reuse_grid
    sequences: dict = {}
    warmed_plain: set = set()
    for batch in batches:
        ids, mask = make_prompts(args, batch, vocab_high)
        for kind in workloads:
            weights.set(kind, alpha)
            for cache in caches:
                for label, reuse in grid:
                    for path in paths:
                        if path == "off" and (batch not in plain_batches or args.plain_grid == "none"
                                              or (args.plain_grid == "baseline" and reuse is not None)):
                            continue
                        if not selected(args, batch, cache, label):
                            continue
                        if out_of_time():
                            results["errors"].append({"skipped": "time budget", "workload": kind.value, "batch": batch,
                                                      "cache": cache, "reuse": label, "path": path})
                            continue
                        name = f"{kind.value} b{batch} cache={'on' if cache else 'off'} {label} path={path}"
                        try:
                            rec, seq = timed_diffusion_run(model, args, ids, mask, cache=cache, reuse=reuse, path=path,
                                                           plain_warmed=batch in warmed_plain)
                            if path == "off":
                                warmed_plain.add(batch)
                            rec = {"workload": kind.value, "batch": batch, "cache": cache, "reuse": label, **rec}
                            if args.reference is not None:
                                rec["reference_tokens_per_second"] = reference_sampler.reference_tokens_per_second(
                                    args.reference, batch, cache, kind.value)
                            key = (kind.value, batch, cache, label)
                            sequences[key + (path,)] = seq
                            plain = sequences.get(key + ("off",))
                            if path != "off" and plain is not None:
                                rec.update(agreement(seq, plain))
                            results["runs"].append(rec)
                            if not rec["full_length"] and kind is Workload.TARGET:
                                raise RuntimeError(f"rows stopped early: {rec['generated_tokens']} tokens of "
                                                   f"{batch * args.new_tokens}")
                            fast = rec["fast_path"]
                            print(f"{name}: {rec['tokens_per_second']} tok/s, {rec['tokens_per_forward']:.2f} tok/fwd, "
                                  f"{rec['ms_per_forward']} ms/fwd, {rec['forwards']} fwd, {rec['layer_calls']} layer execs, "
                                  f"warm-up {rec['warmup_seconds']:.1f}s, "
                                  f"fast={fast.get('mode') if isinstance(fast, dict) else fast}", flush=True)
                        except Exception as err:  # keep the table: one failure must not lose the rest
                            failed(name, err)
                        save()
        # Fast-vs-plain agreement for fast runs that ran before their plain twin.
        for rec in results["runs"]:
            key = (rec["workload"], rec["batch"], rec["cache"], rec["reuse"])
            if rec["path"] != "off" and "token_agreement" not in rec and key + ("off",) in sequences:
                rec.update(agreement(sequences[key + (rec["path"],)], sequences[key + ("off",)]))
        save()
    weights.set(Workload.RANDOM)

    if args.ar != ArMode.OFF.value:
        for batch in _csv(args.ar_batch_sizes, int) if args.ar_batch_sizes else batches:
            name = f"b{batch} ar-{args.ar}"
            if out_of_time():
                results["errors"].append({"skipped": "time budget", "batch": batch, "path": f"ar-{args.ar}"})
                continue
            print(f"{name}: warm-up (transformers compiles on CUDA with a static cache) ...", flush=True)
            try:
                ids, mask = make_prompts(args, batch, vocab_high)
                rec = baselines.autoregressive_run(model, ids, mask, args.new_tokens, ArMode(args.ar), repeats=args.repeats)
                results["autoregressive"].append(rec)
                print(f"{name}: {rec['tokens_per_second']} tok/s, {rec['ms_per_token']} ms/token, "
                      f"warm-up {rec['warmup_seconds']:.1f}s", flush=True)
            except Exception as err:
                failed(name, err)
            save()

    if args.profile and not out_of_time():
        for path in _csv(args.profile):
            try:
                results["profiles"][path] = profile_run(model, args, vocab_high, path)
                print(f"\nprofile (batch {args.profile_batch}, {args.profile_tokens} new tokens, path={path}):\n{results['profiles'][path]['table']}",
                      flush=True)
            except Exception as err:
                results["errors"].append({"run": f"profile {path}", "error": f"{type(err).__name__}: {err}",
                                          "traceback": traceback.format_exc()[-3000:]})
                print(f"profile {path}: FAILED {type(err).__name__}: {err}", flush=True)
            save()

    if args.graph_check:
        results["graph_check"] = []
        for batch in _csv(args.graph_check, int):
            try:
                results["graph_check"].append(graph_check(model, args, vocab_high, batch))
                print("graph check:", json.dumps(results["graph_check"][-1]), flush=True)
            except Exception as err:
                results["errors"].append({"run": f"graph check b{batch}", "error": f"{type(err).__name__}: {err}",
                                          "traceback": traceback.format_exc()[-3000:]})
                print(f"graph check b{batch}: FAILED {type(err).__name__}: {err}", flush=True)
            save()

    if args.agreement and not out_of_time():
        del model
        if args.device.startswith("cuda"):
            torch.cuda.empty_cache()
        try:
            results["agreement_check"] = agreement_check(raw, args, vocab_high, batches)
        except Exception as err:
            results["errors"].append({"run": "agreement check", "error": f"{type(err).__name__}: {err}",
                                      "traceback": traceback.format_exc()[-3000:]})
            print(f"agreement check: FAILED {type(err).__name__}: {err}", flush=True)
        save()

    results["total_seconds"] = round(time.perf_counter() - t_start, 1)
    save()
    print()
    print(render_table(results))
    return results


def profile_run(model, args, vocab_high, path):
    from torch.profiler import ProfilerActivity, profile

    ids, mask = make_prompts(args, args.profile_batch, vocab_high)
    run_one(model, args, ids, mask, cache=True, reuse=None, path=path, new_tokens=args.profile_tokens)  # warm-up
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if args.device.startswith("cuda") else [])
    with profile(activities=acts) as prof:
        _, stats, wall = run_one(model, args, ids, mask, cache=True, reuse=None, path=path, new_tokens=args.profile_tokens)
    sort = "cuda_time_total" if args.device.startswith("cuda") else "cpu_time_total"
    table = prof.key_averages().table(sort_by=sort, row_limit=18, max_name_column_width=60)
    events = prof.key_averages()
    cuda_total = sum(getattr(e, "self_device_time_total", 0) or 0 for e in events) / 1e3
    return {"wall_seconds": round(wall, 4), "forwards": stats["forwards"],
            "ms_per_forward": round(1000 * wall / stats["forwards"], 3),
            "device_busy_ms": round(cuda_total, 1), "device_busy_fraction": round(cuda_total / (1000 * wall), 3),
            "table": table}


def graph_check(model, args, vocab_high, batch):
    from dllm_generation import LayerReuseConfig

    ids, mask = make_prompts(args, batch, vocab_high, seed_offset=3)
    reuse = LayerReuseConfig(k=2, subset="first", **_size_kwarg(args))
    seqs = {}
    for path in ("uncaptured", "graphs", "compile"):
        seqs[path], stats, wall = run_one(model, args, ids, mask, cache=True, reuse=reuse, path=path, new_tokens=64)
    return {"batch": batch, "graphs_vs_uncaptured": agreement(seqs["graphs"], seqs["uncaptured"]),
            "compile_vs_graphs": agreement(seqs["compile"], seqs["graphs"])}


def agreement_check(raw, args, vocab_high, batches):
    """Fast vs plain on a 4-layer model of the same width with peaky random weights: decisive logits,
    so a correct fast path must reproduce the plain path's tokens up to rare bf16 near-ties."""
    from dllm_generation import LayerReuseConfig

    model = build_model(raw, args, num_layers=4, peaky=True)
    out = []
    for batch in batches:
        ids, mask = make_prompts(args, batch, vocab_high, seed_offset=7)
        for cache in (True, False):
            for label, reuse in (("none", None), ("k2-first", LayerReuseConfig(k=2, subset="first", size=2)),
                                 ("k3-last-residual", LayerReuseConfig(k=3, subset="last", size=2, mode="residual"))):
                plain, ps, _ = run_one(model, args, ids, mask, cache=cache, reuse=reuse, path="off", new_tokens=args.new_tokens)
                fast, fs, _ = run_one(model, args, ids, mask, cache=cache, reuse=reuse, path="on", new_tokens=args.new_tokens)
                rec = {"batch": batch, "cache": cache, "reuse": label, **agreement(fast, plain),
                       "forwards_plain": ps["forwards"], "forwards_fast": fs["forwards"],
                       "fast_path": fast_path_mode(fs.get("fast_path"))}
                out.append(rec)
                print(f"agreement (peaky 4-layer) b{batch} cache={cache} {label}: {rec['token_agreement']} "
                      f"({rec['rows_identical']}/{rec['rows']} rows identical), forwards {ps['forwards']} vs {fs['forwards']}",
                      flush=True)
    del model
    return out


def failures(results) -> list[dict]:
    """Runs that failed (runs skipped for the time budget are not failures)."""
    return [e for e in results["errors"] if "skipped" not in e]


if __name__ == "__main__":
    outcome = main()
    failed = failures(outcome)
    if failed:
        print(f"{len(failed)} run(s) failed", file=sys.stderr)
    sys.exit(1 if failed else 0)
