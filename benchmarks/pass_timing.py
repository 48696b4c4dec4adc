"""Where a denoising pass spends its time: replay time of every captured pass per engine mode, and the
matrix products alone, per kind of weight.

The throughput benchmark (throughput.py) times whole decodes. This script takes one decode apart:

* **matrix products alone**: every weight of one forward (q, k, v, o, gate, up, down per layer, and the
  lm_head on one sub-block of tokens) multiplied by `--tokens` rows, one kind at a time, captured in
  one CUDA graph and replayed, with the bandwidth each kind reaches; per BLAS library (`--blas`); and
  gate/up as one product, through the BLAS library and, where the engine uses it (bf16/fp16 on Hopper,
  at most 32 tokens), its small-M kernel;
* **passes**: for each engine mode (`--modes`), one batch-1 decode with the block cache on, then each
  captured pass's graph replayed back to back (so the host does nothing in between), next to the
  decode's ms per forward: the difference is what the host adds per forward. The modes:
  `graphs` and `compile` are the library's own (`fast_path` values); `compile-static` compiles the
  layer functions once per pass size instead of once for all sizes; `compile-autotune` does so with
  inductor's GEMM autotuning (`max-autotune-no-cudagraphs`).

    python benchmarks/pass_timing.py --config fast_dllm_v2_7b/config.json --json-out passes.json
    python benchmarks/pass_timing.py --tiny     # CPU smoke run: matrix products and uncaptured decodes only

Random weights of the config's shape, built on the device (throughput.py's `build_model`).
"""

from __future__ import annotations

import argparse
import json
import sys
import time

import torch
import torch.nn.functional as F

from dllm_generation.eval.artifacts import write_text_atomic

import throughput  # benchmarks/throughput.py, beside this script (as fast_path_agreement.py imports it)

COMPILE_VARIANTS = {"compile-static": dict(dynamic=False),
                    "compile-autotune": dict(dynamic=False, mode="max-autotune-no-cudagraphs")}
MODES = ("graphs", "compile", *COMPILE_VARIANTS)
BLAS = ("cublas", "cublaslt")
WEIGHT_KINDS = ("q", "k", "v", "o", "gate", "up", "down", "head")


def parse_args(argv=None):
    p = throughput.OneLineParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--config", default=None, help="the checkpoint's config.json giving the model shape "
                   "(default: ../shared/data/fast_dllm_v2_7b/ beside the repository)")
    p.add_argument("--tiny", action="store_true", help="CPU smoke run: tiny config, float32")
    p.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    p.add_argument("--dtype", default=None, help="default: bfloat16 on CUDA, float32 on CPU")
    p.add_argument("--modes", default=None,
                   help=f"comma list of {list(MODES)} (default: all on CUDA; on the CPU the uncaptured engine only)")
    p.add_argument("--tokens", default="8,32", help="comma list of token counts for the matrix products alone")
    p.add_argument("--blas", default=None, help=f"comma list of {list(BLAS)} (CUDA only; default: both)")
    p.add_argument("--new-tokens", type=int, default=128, help="new tokens of each timed decode")
    p.add_argument("--replays", type=int, default=60, help="replays per captured pass")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json-out", default=None, help="write the results here (atomically)")
    args = p.parse_args(argv)
    args.device = args.device or ("cuda" if torch.cuda.is_available() and not args.tiny else "cpu")
    args.dtype = args.dtype or ("bfloat16" if args.device.startswith("cuda") else "float32")
    cuda = args.device.startswith("cuda")
    if args.device != "cpu" and not cuda:
        p.error(f"--device must be cpu or cuda[:N], got {args.device!r}")
    if cuda and not torch.cuda.is_available():
        p.error("--device cuda: CUDA is not available here (use --device cpu or --tiny)")
    if args.dtype not in ("bfloat16", "float16", "float32"):
        p.error(f"--dtype must be one of ['bfloat16', 'float16', 'float32'], got {args.dtype!r}")
    modes = throughput._csv(args.modes) if args.modes is not None else (list(MODES) if cuda else [])
    if any(m not in MODES for m in modes) or (args.modes is not None and not modes):
        p.error(f"--modes takes a comma list of {list(MODES)}, got {args.modes!r}")
    if modes and not cuda:
        p.error(f"--modes {','.join(modes)} captures CUDA graphs and needs --device cuda (the CPU runs the uncaptured "
                "engine only)")
    args.modes = modes
    try:
        args.tokens = throughput._csv(args.tokens, int)
    except ValueError:
        args.tokens = []
    if not args.tokens or any(t <= 0 for t in args.tokens):
        p.error("--tokens takes a comma list of positive integers")
    blas = throughput._csv(args.blas) if args.blas is not None else (list(BLAS) if cuda else [])
    if any(b not in BLAS for b in blas) or (args.blas is not None and not blas):
        p.error(f"--blas takes a comma list of {list(BLAS)}, got {args.blas!r}")
    if blas and not cuda:
        p.error("--blas chooses a CUDA BLAS library and needs --device cuda")
    args.blas = blas
    for option, value in (("--new-tokens", args.new_tokens), ("--replays", args.replays)):
        if value <= 0:
            p.error(f"{option} must be a positive integer, got {value}")
    # throughput.py's model and prompt helpers read these
    args.init_std, args.prompt_min, args.prompt_max = 0.02, 96, 160
    args.block_size, args.small_block_size, args.threshold = 32, 8, 0.9
    if args.tiny:
        args.init_std = throughput.TINY_GRID["init_std"]
        args.prompt_min, args.prompt_max = 20, 40
    return args


def _time_ms(fn, repeats: int, cuda: bool) -> float:
    """ms per call of `fn` (on CUDA a graph replay or any launch; timed with events)."""
    for _ in range(3):
        fn()
    if cuda:
        torch.cuda.synchronize()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(repeats):
            fn()
        end.record()
        torch.cuda.synchronize()
        return start.elapsed_time(end) / repeats
    t0 = time.perf_counter()
    for _ in range(repeats):
        fn()
    return (time.perf_counter() - t0) * 1e3 / repeats


def weights_by_kind(model) -> dict[str, list[torch.Tensor]]:
    kinds = {kind: [] for kind in WEIGHT_KINDS}
    for layer in model.model.layers:
        attn, mlp = layer.self_attn, layer.mlp
        for kind, linear in zip(WEIGHT_KINDS, (attn.q_proj, attn.k_proj, attn.v_proj, attn.o_proj, mlp.gate_proj,
                                               mlp.up_proj, mlp.down_proj)):
            kinds[kind].append(linear.weight)
    kinds["head"].append(model.lm_head.weight)
    return kinds


def matrix_products(model, args, tokens: int) -> dict:
    """Per kind of weight: ms for all of one forward's products of that kind, and GB/s of weight read."""
    cuda = args.device.startswith("cuda")
    dtype = model.lm_head.weight.dtype
    kinds = weights_by_kind(model)
    inputs = {}
    for weights in kinds.values():
        for w in weights:
            inputs.setdefault(w.shape[1], torch.randn(tokens, w.shape[1], device=w.device, dtype=dtype))
    result = {}
    for kind, weights in kinds.items():
        rows = min(tokens, args.small_block_size) if kind == "head" else tokens  # logits of one sub-block

        def products(weights=weights, rows=rows):
            for w in weights:
                F.linear(inputs[w.shape[1]][:rows], w)

        result[kind] = _time_products(products, sum(w.numel() * w.element_size() for w in weights), cuda)
    total_ms = sum(v["ms"] for v in result.values())
    total_bytes = sum(v["bytes"] for v in result.values())
    result["all"] = {"ms": round(total_ms, 4), "gb_per_second": round(total_bytes / total_ms / 1e6, 1),
                     "bytes": total_bytes}
    result.update(fused_gate_up_products(kinds, inputs, tokens, cuda))
    return result


def fused_gate_up_products(kinds, inputs, tokens: int, cuda: bool) -> dict:
    """Gate and up as one product per layer, as the graphed engine's few-token passes run them: through
    the BLAS library (`gate_up`) and, where the engine would use it, the small-M kernel
    (`gate_up_small_m`). Not part of "all" (the same bytes as gate + up)."""
    from dllm_generation.engines.small_m_linear import MAX_TOKENS, small_m_linear, support_reason

    fused = [torch.cat([gate, up]) for gate, up in zip(kinds["gate"], kinds["up"])]
    x = inputs[fused[0].shape[1]]
    variants = {"gate_up": lambda: [F.linear(x, w) for w in fused]}
    if tokens <= MAX_TOKENS and support_reason(x.device, x.dtype, *fused[0].shape) is None:
        variants["gate_up_small_m"] = lambda: [small_m_linear(x, w) for w in fused]
    nbytes = sum(w.numel() * w.element_size() for w in fused)
    return {name: _time_products(products, nbytes, cuda) for name, products in variants.items()}


def _time_products(products, nbytes: int, cuda: bool) -> dict:
    """ms per call of `products` (on CUDA captured in one graph and replayed) and the weight bytes it reads."""
    run = products
    if cuda:
        products()
        torch.cuda.synchronize()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            products()
        run = graph.replay
    ms = _time_ms(run, 30 if cuda else 3, cuda)
    return {"ms": round(ms, 4), "gb_per_second": round(nbytes / ms / 1e6, 1), "bytes": nbytes}


def _use_variant(engine, options: dict) -> None:
    """Compile the engine's layer functions with other torch.compile options (graphs re-captured)."""
    engine.packed.set_layer_functions(True, **options)
    engine.captured.drop()


def time_mode(model, args, mode: str | None, ids, mask) -> dict:
    """One warm decode, then timed decodes and (on CUDA) every captured pass replayed back to back."""
    from dllm_generation.engines import release
    from dllm_generation.engines.selection import graphed_engine_of

    release(model)
    torch._dynamo.reset()
    path = {"graphs": "graphs", None: "uncaptured"}.get(mode, "compile")
    run = dict(cache=True, reuse=None, path=path, new_tokens=args.new_tokens)
    t0 = time.perf_counter()
    throughput.run_one(model, args, ids, mask, **run)
    if mode in COMPILE_VARIANTS:
        _use_variant(graphed_engine_of(model), COMPILE_VARIANTS[mode])
        throughput.run_one(model, args, ids, mask, **run)
    first_seconds = time.perf_counter() - t0
    per_forward = []
    for _ in range(3):
        _, stats, wall = throughput.run_one(model, args, ids, mask, **run)
        per_forward.append(round(wall * 1e3 / stats["forwards"], 3))
    engine = graphed_engine_of(model)
    passes = {}
    for key, graph in list(engine.captured.graphs.items()):
        name = f"{'commit' if key.commit else 'step'} rb{key.rb} rs{key.rs}"
        passes[name] = round(_time_ms(graph.replay, args.replays, True), 3)
    return {"first_calls_seconds": round(first_seconds, 2), "ms_per_forward": per_forward,
            "forwards": stats["forwards"], "replay_ms": passes, "engine": engine.describe()}


def main(argv=None) -> int:
    args = parse_args(argv)
    raw = throughput.load_hub_config(args)
    torch.manual_seed(args.seed)
    model = throughput.build_model(raw, args)
    vocab_high = throughput.workload.prompt_vocab_high(int(raw["vocab_size"]))
    ids, mask = throughput.make_prompts(args, 1, vocab_high)
    results = {"environment": throughput.environment(args), "arguments": dict(vars(args)),
               "matrix_products": {}, "modes": {}}
    results["environment"]["weights_floor"] = floor = throughput.baselines.weights_stream_floor(model)
    print(f"weights-stream floor: {floor['gigabytes']} GB read in {floor['ms']} ms ({floor['gb_per_second']} GB/s)",
          flush=True)
    for library in args.blas or [None]:
        if library is not None:
            torch.backends.cuda.preferred_blas_library(library)
        for tokens in args.tokens:
            label = f"{library or 'default'} tokens={tokens}"
            results["matrix_products"][label] = found = matrix_products(model, args, tokens)
            print(f"matrix products alone, {label}: " + ", ".join(
                f"{kind} {v['ms']:.3f} ms ({v['gb_per_second']:.0f} GB/s)" for kind, v in found.items()), flush=True)
    if args.blas:
        torch.backends.cuda.preferred_blas_library("cublas")
    for mode in args.modes or [None]:
        label = mode or "uncaptured"
        results["modes"][label] = found = time_mode(model, args, mode, ids, mask)
        print(f"{label}: ms/forward {found['ms_per_forward']}, replay per pass {found['replay_ms']}, first calls "
              f"{found['first_calls_seconds']} s", flush=True)
    if args.json_out:
        write_text_atomic(args.json_out, json.dumps(results, indent=1, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
