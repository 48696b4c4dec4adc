#!/usr/bin/env python
"""Decoding throughput on a fixed workload: random weights of a checkpoint's shape.

Workload: random weights of the checkpoint's exact shape (default: Fast_dLLM_v2_7B's config.json),
bf16, SDPA; prompts of 96-160 random tokens; 256 new tokens; block 32, sub-block 8, threshold
0.9. With random weights every step unmasks exactly one token per row, so the work is fixed.
Grid: batch sizes x block cache on/off x (no layer reuse, k in {1,2,3} x {first, middle, last})
x fast path on/off. Warm-up runs (same prompts, so every CUDA graph a timed run needs exists)
are excluded from the timings.

Prints one table: tokens/s, ms per forward (wall / forwards), forwards, layer executions,
speedup over our own run without layer reuse (same batch, cache, path) and its bound from the
counted layer executions (executions without reuse / executions at this config), and, where
both paths ran, the token agreement between the fast and the plain path. Exits 1 if any run
failed.

    hf download Efficient-Large-Model/Fast_dLLM_v2_7B config.json --local-dir fast_dllm_v2_7b
    python benchmarks/throughput.py --config fast_dllm_v2_7b/config.json --json-out results.json
    python benchmarks/throughput.py --tiny          # CPU smoke run: tiny config, small grid (seconds to a minute)
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import platform
import sys
import time
import traceback

import torch

from dllm_generation.eval.cli import parse_size

# Without --config: the Fast_dLLM_v2_7B config.json in the data folder beside the repository, if present.
DEFAULT_CONFIG = os.path.join(os.path.dirname(__file__), "..", "..", "shared", "data", "fast_dllm_v2_7b", "config.json")
MASK_ID, EOS_ID, PAD_ID = 151665, 151645, 151643
TINY = dict(num_hidden_layers=4, hidden_size=64, intermediate_size=128, num_attention_heads=4,
            num_key_value_heads=2, vocab_size=512, max_position_embeddings=2048)
# --tiny's grid, for every option left unset: small enough for a CPU in about a minute.
TINY_GRID = dict(batch_sizes="1,3", new_tokens=40, k="2", subsets="first,last", cache="on,off",
                 fast_path="eager,off", warmup="short")
FULL_GRID = dict(batch_sizes="1,8,32", new_tokens=256, k="1,2,3", subsets="first,middle,last", cache="on,off",
                 fast_path="on,off", warmup="full")


def _csv(value, cast=str):
    return [cast(v) for v in str(value).split(",") if v != ""]


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
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
    p.add_argument("--k", default=None, help=f"layer-reuse k values (default: {FULL_GRID['k']})")
    p.add_argument("--subsets", default=None, help=f"default: {FULL_GRID['subsets']}")
    p.add_argument("--reuse-size", type=parse_size, default=None,
                   help="layers in the reuse subset: a count (12) or a share of the layers (0.5); default: "
                        "LayerReuseConfig's, 12 of 28 layers as a share")
    p.add_argument("--no-baseline", action="store_true", help="skip the layer_reuse=None runs")
    p.add_argument("--only", default="",
                   help="comma list of BATCH:CACHE:REUSE items (e.g. 32:on:k3-first, '*' matches anything): for the "
                        "batch sizes named there, run only the matching configs")
    p.add_argument("--fast-path", default=None,
                   help=f"paths to run: on (default fast path), off (plain), eager, graphs, compile (default: "
                        f"{FULL_GRID['fast_path']})")
    p.add_argument("--plain-grid", choices=("all", "baseline", "none"), default="all",
                   help="which reuse settings the plain path (off) runs: all, only layer_reuse=None, none")
    p.add_argument("--plain-batch-sizes", default=None, help="batch sizes for the plain path (default: --batch-sizes)")
    p.add_argument("--repeats", type=int, default=1, help="timed runs per config (the median is reported)")
    p.add_argument("--warmup", choices=("full", "short", "none"), default=None,
                   help="full: one untimed run of the same workload before timing; short: 2 blocks (default: full)")
    p.add_argument("--short-warmup-batches", default="",
                   help="batch sizes whose fast-path warm-up is 2 blocks only (batch 1 meets every pass shape in 2 "
                        "blocks; a timed run's 'captures' in the JSON shows any shape it met first)")
    p.add_argument("--init-std", type=float, default=0.02)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json-out", default=None, help="write all results (and environment) here, updated after every run")
    p.add_argument("--profile", default=None, help="comma list of paths (off,on,...) to profile at batch 1 (torch.profiler)")
    p.add_argument("--profile-tokens", type=int, default=64)
    p.add_argument("--agreement", action="store_true",
                   help="also check fast vs plain tokens on a shallow model with peaky random weights (decisive logits)")
    p.add_argument("--graph-check", default=None,
                   help="comma list of batch sizes: on the benchmark model, compare the fast path with CUDA graphs "
                        "(graphs) against the same code run eagerly (eager), block cache on, k2-first, 64 new tokens: "
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
    return args


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
    return model


def make_prompts(args, batch: int, vocab_high: int, seed_offset: int = 0):
    gen = torch.Generator().manual_seed(args.seed * 1000 + batch + seed_offset)
    lengths = torch.randint(args.prompt_min, args.prompt_max + 1, (batch,), generator=gen).tolist()
    prompts = [torch.randint(0, vocab_high, (n,), generator=gen).tolist() for n in lengths]
    width = max(lengths)
    ids = torch.zeros((batch, width), dtype=torch.long)
    mask = torch.zeros_like(ids)
    for r, p in enumerate(prompts):
        ids[r, width - len(p):] = torch.tensor(p)
        mask[r, width - len(p):] = 1
    return ids.to(args.device), mask.to(args.device)


PATH_VALUES = {"on": None, "off": False, "eager": "eager", "graphs": "graphs", "compile": "compile"}


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
    from dllm_generation import LayerReuseConfig

    grid = [] if args.no_baseline else [("none", None)]
    for k in _csv(args.k, int):
        for subset in _csv(args.subsets):
            grid.append((f"k{k}-{subset}", LayerReuseConfig(k=k, subset=subset, **_size_kwarg(args))))
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
def main(argv=None):
    args = parse_args(argv)
    t_start = time.perf_counter()
    torch.manual_seed(args.seed)
    env = environment(args)
    print("environment:", json.dumps(env), flush=True)
    raw = load_hub_config(args)
    t0 = time.perf_counter()
    model = build_model(raw, args)
    vocab_high = min(int(raw["vocab_size"]) - 8, PAD_ID)
    env["model_build_seconds"] = round(time.perf_counter() - t0, 1)
    env["model"] = {k: raw.get(k) for k in ("num_hidden_layers", "hidden_size", "intermediate_size", "num_attention_heads",
                                            "num_key_value_heads", "vocab_size")}
    env["params_billion"] = round(sum(p.numel() for p in model.parameters()) / 1e9, 3)
    print(f"model: {env['model']} ({env['params_billion']} B params) built in {env['model_build_seconds']} s", flush=True)
    results: dict = {"environment": env, "args": vars(args), "runs": [], "errors": [], "profiles": {}, "agreement_check": []}

    def save():
        if args.json_out:
            tmp = args.json_out + ".tmp"
            with open(tmp, "w", encoding="utf-8") as f:
                json.dump(results, f, indent=1)
            os.replace(tmp, args.json_out)

    def out_of_time():
        return args.time_budget is not None and time.perf_counter() - t_start > args.time_budget

    paths = _csv(args.fast_path)
    batches = _csv(args.batch_sizes, int)
    plain_batches = _csv(args.plain_batch_sizes, int) if args.plain_batch_sizes else batches
    caches = [c == "on" for c in _csv(args.cache)]
    grid = reuse_grid(args)
    sequences: dict = {}
    warmed_plain: set = set()
    for batch in batches:
        ids, mask = make_prompts(args, batch, vocab_high)
        for cache in caches:
            for label, reuse in grid:
                for path in paths:
                    if path == "off" and (batch not in plain_batches or (args.plain_grid == "baseline" and reuse is not None)
                                          or args.plain_grid == "none"):
                        continue
                    if not selected(args, batch, cache, label):
                        continue
                    if out_of_time():
                        results["errors"].append({"skipped": "time budget", "batch": batch, "cache": cache,
                                                  "reuse": label, "path": path})
                        continue
                    name = f"b{batch} cache={'on' if cache else 'off'} {label} path={path}"
                    try:
                        warm = 0.0
                        if args.warmup != "none" and (path != "off" or batch not in warmed_plain):
                            short = args.warmup == "short" or path == "off" or batch in _csv(args.short_warmup_batches, int)
                            n = 2 * args.block_size if short else args.new_tokens
                            t0 = time.perf_counter()
                            run_one(model, args, ids, mask, cache=cache, reuse=reuse, path=path, new_tokens=n)
                            warm = time.perf_counter() - t0
                            warmed_plain.add(batch) if path == "off" else None
                        walls, stats, seq = [], None, None
                        for _ in range(max(1, args.repeats)):
                            seq, stats, wall = run_one(model, args, ids, mask, cache=cache, reuse=reuse, path=path,
                                                       new_tokens=args.new_tokens)
                            walls.append(wall)
                        wall = sorted(walls)[len(walls) // 2]
                        rec = {"batch": batch, "cache": cache, "reuse": label, "path": path, "wall_seconds": round(wall, 4),
                               "walls": [round(w, 4) for w in walls], "warmup_seconds": round(warm, 2),
                               "generated_tokens": stats["generated_tokens"],
                               "tokens_per_second": round(stats["generated_tokens"] / wall, 2),
                               "ms_per_forward": round(1000 * wall / stats["forwards"], 3),
                               **{k: stats[k] for k in ("forwards", "prefill_forwards", "commit_forwards", "block_forwards",
                                                        "sub_block_forwards", "denoising_steps", "layer_calls",
                                                        "layer_calls_skipped")},
                               "fast_path": stats.get("fast_path")}
                        sequences[(batch, cache, label, path)] = seq
                        plain = sequences.get((batch, cache, label, "off"))
                        if path != "off" and plain is not None:
                            rec.update(agreement(seq, plain))
                        results["runs"].append(rec)
                        print(f"{name}: {rec['tokens_per_second']} tok/s, {rec['ms_per_forward']} ms/fwd, "
                              f"{rec['forwards']} fwd, {rec['layer_calls']} layer execs, warm-up {warm:.1f}s, "
                              f"fast={rec['fast_path'] if isinstance(rec['fast_path'], str) else rec['fast_path'].get('mode')}",
                              flush=True)
                    except Exception as err:  # keep the table: one failure must not lose the rest
                        results["errors"].append({"run": name, "error": f"{type(err).__name__}: {err}",
                                                  "traceback": traceback.format_exc()[-3000:]})
                        print(f"{name}: FAILED {type(err).__name__}: {err}", flush=True)
                        if args.device.startswith("cuda"):
                            torch.cuda.synchronize()
                            torch.cuda.empty_cache()
                    save()
        # Fast-vs-plain agreement for fast runs that ran before their plain twin.
        for rec in results["runs"]:
            if rec["path"] != "off" and "token_agreement" not in rec:
                plain = sequences.get((rec["batch"], rec["cache"], rec["reuse"], "off"))
                if plain is not None:
                    rec.update(agreement(sequences[(rec["batch"], rec["cache"], rec["reuse"], rec["path"])], plain))
        save()

    if args.profile and not out_of_time():
        for path in _csv(args.profile):
            try:
                results["profiles"][path] = profile_run(model, args, vocab_high, path)
                print(f"\nprofile (batch 1, {args.profile_tokens} new tokens, path={path}):\n{results['profiles'][path]['table']}",
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

    ids, mask = make_prompts(args, 1, vocab_high)
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
    for path in ("eager", "graphs", "compile"):
        seqs[path], stats, wall = run_one(model, args, ids, mask, cache=True, reuse=reuse, path=path, new_tokens=64)
    return {"batch": batch, "graphs_vs_eager": agreement(seqs["graphs"], seqs["eager"]),
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
                       "fast_path": fs.get("fast_path") if isinstance(fs.get("fast_path"), str) else fs["fast_path"]["mode"]}
                out.append(rec)
                print(f"agreement (peaky 4-layer) b{batch} cache={cache} {label}: {rec['token_agreement']} "
                      f"({rec['rows_identical']}/{rec['rows']} rows identical), forwards {ps['forwards']} vs {fs['forwards']}",
                      flush=True)
    del model
    return out


def render_table(results) -> str:
    env = results["environment"]
    runs = results["runs"]
    lines = [f"device: {env.get('gpu', env.get('cpu'))} | torch {env['torch']} | transformers {env['transformers']} | "
             f"dtype {env['dtype']} | {env['date']}"]
    head = ("batch", "cache", "reuse", "path", "tok/s", "ms/fwd", "fwds", "layer execs", "speedup", "bound", "%bound",
            "vs plain", "agree")
    rows = []
    base = {(r["batch"], r["cache"], r["path"]): r for r in runs if r["reuse"] == "none"}
    for r in runs:
        b = base.get((r["batch"], r["cache"], r["path"]))
        speed = bound = pct = ""
        if b is not None and r["reuse"] != "none":
            s = r["tokens_per_second"] / b["tokens_per_second"]
            bd = b["layer_calls"] / r["layer_calls"] if r["layer_calls"] else float("nan")
            speed, bound, pct = f"{s:.3f}", f"{bd:.3f}", f"{100 * s / bd:.0f}%"
        plain = base.get((r["batch"], r["cache"], "off"))
        vs = f"{r['tokens_per_second'] / plain['tokens_per_second']:.2f}x" if (plain and r["path"] != "off") else ""
        agree = f"{r['token_agreement']:.3f}" if "token_agreement" in r else ""
        rows.append((str(r["batch"]), "on" if r["cache"] else "off", r["reuse"], r["path"], f"{r['tokens_per_second']:.1f}",
                     f"{r['ms_per_forward']:.2f}", str(r["forwards"]), str(r["layer_calls"]), speed, bound, pct, vs, agree))
    widths = [max(len(h), *(len(row[i]) for row in rows)) if rows else len(h) for i, h in enumerate(head)]
    fmt = " | ".join("{:>%d}" % w for w in widths)
    lines.append(fmt.format(*head))
    lines.append("-+-".join("-" * w for w in widths))
    lines += [fmt.format(*row) for row in rows]
    if results.get("agreement_check"):
        lines.append("")
        lines.append("fast vs plain, 4-layer model with peaky random weights (decisive logits):")
        for a in results["agreement_check"]:
            lines.append(f"  b{a['batch']} cache={'on' if a['cache'] else 'off'} {a['reuse']}: agreement {a['token_agreement']:.4f}, "
                         f"{a['rows_identical']}/{a['rows']} rows identical")
    modes = sorted({r["fast_path"]["mode"] for r in runs if isinstance(r.get("fast_path"), dict)})
    if modes:
        lines.append(f"fast path modes used by path=on/graphs/compile runs: {', '.join(modes)}")
    for g in results.get("graph_check", []):
        lines.append(f"graph check b{g['batch']}: graphs vs eager agreement {g['graphs_vs_eager']['token_agreement']}, "
                     f"compile vs graphs {g['compile_vs_graphs']['token_agreement']}")
    for e in results["errors"]:
        lines.append(f"error: {e.get('run', e)}: {e.get('error', '')}")
    return "\n".join(lines)


def failures(results) -> list[dict]:
    """Runs that failed (runs skipped for the time budget are not failures)."""
    return [e for e in results["errors"] if "skipped" not in e]


if __name__ == "__main__":
    outcome = main()
    failed = failures(outcome)
    if failed:
        print(f"{len(failed)} run(s) failed", file=sys.stderr)
    sys.exit(1 if failed else 0)
