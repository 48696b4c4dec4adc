"""Agreement of every graphed-engine mode with the eager engine, in float32 and bf16 (needs CUDA).
Each cell names how many device loops (steps repeated on the GPU) its decode launched.

A 4-layer model of the hub config's width with peaky random weights, batch 1 and 8, block cache off
and on, no layer reuse and three reuse policies. In float32 every mode must give the eager engine's
tokens, forwards and layer executions (the script exits 1 otherwise); bf16 shows what rounding alone
does. Usage: python benchmarks/fast_path_agreement.py [path/to/config.json]
(default: throughput.py's default config).
"""
import sys

import torch

import throughput as T  # benchmarks/throughput.py, beside this script
from dllm_generation import LayerReuseConfig

REUSE = {"none": None,
         "k2-first": LayerReuseConfig(k=2, subset="first", size=2),
         "ks2.3-first": LayerReuseConfig(policy="per_layer", layer_k=[2, 3], subset="first", size=2),
         "drift0.5-last": LayerReuseConfig(policy="unmask_drift", tolerance=0.5, subset="last", size=2)}
COUNTERS = ("forwards", "block_forwards", "sub_block_forwards", "layer_calls", "layer_calls_skipped")

config = ["--config", sys.argv[1]] if len(sys.argv) > 1 else []
float32_failures = 0
for dtype in ("float32", "bfloat16"):
    args = T.parse_args([*config, "--device", "cuda", "--dtype", dtype, "--new-tokens", "64"])
    raw = T.load_hub_config(args)
    model = T.build_model(raw, args, num_layers=4, peaky=True)
    vocab_high = T.workload.prompt_vocab_high(int(raw["vocab_size"]))
    for batch in (1, 8):
        ids, mask = T.make_prompts(args, batch, vocab_high, seed_offset=7)
        for cache in (False, True):
            for label, reuse in REUSE.items():
                outs, loops = {}, {}
                for path in ("off", "uncaptured", "graphs", "compile"):
                    try:
                        seq, stats, _ = T.run_one(model, args, ids, mask, cache=cache, reuse=reuse, path=path,
                                                  new_tokens=64)
                        outs[path] = (seq, {k: stats[k] for k in COUNTERS})
                        described = stats.get("fast_path")
                        if isinstance(described, dict):  # steps repeated on the GPU (device loops) in this decode
                            loops[path] = described.get("device_loop_launches", 0)
                    except Exception as err:
                        print("FAIL", dtype, batch, cache, label, path, type(err).__name__, str(err)[:200], flush=True)
                        float32_failures += dtype == "float32"
                ref_seq, ref_counts = outs["off"]
                cells = []
                for path, (seq, counts) in outs.items():
                    if path == "off":
                        continue
                    agree = T.agreement(seq, ref_seq)["token_agreement"]
                    same = counts == ref_counts
                    looped = f" [{loops[path]} device loops]" if loops.get(path) else ""
                    cells.append(f"{path} {agree:.3f}{looped}{'' if same else ' (counters differ)'}")
                    if dtype == "float32" and (agree != 1.0 or not same):
                        float32_failures += 1
                print(f"{dtype} b{batch} cache={'on' if cache else 'off'} {label}: " + ", ".join(cells), flush=True)
    del model
    torch.cuda.empty_cache()
print("float32 cells that differ from the eager engine:", float32_failures, flush=True)
sys.exit(1 if float32_failures else 0)
