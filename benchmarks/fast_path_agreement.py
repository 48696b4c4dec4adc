"""Token agreement of every graphed-engine mode with the eager engine, in float32 and bf16 (needs CUDA).

A 4-layer model of the hub config's width with peaky random weights, batch 1 and 8, block cache off
and on. float32 isolates logic errors (every variant must equal the plain path); bf16 shows what
rounding alone does. Usage: python benchmarks/fast_path_agreement.py [path/to/config.json]
(default: throughput.py's default config).
"""
import sys

import torch

import throughput as T  # benchmarks/throughput.py, beside this script

config = ["--config", sys.argv[1]] if len(sys.argv) > 1 else []
for dtype in ("float32", "bfloat16"):
    args = T.parse_args([*config, "--device", "cuda", "--dtype", dtype, "--new-tokens", "64"])
    raw = T.load_hub_config(args)
    model = T.build_model(raw, args, num_layers=4, peaky=True)
    vocab_high = min(int(raw["vocab_size"]) - 8, T.PAD_ID)
    for batch in (1, 8):
        ids, mask = T.make_prompts(args, batch, vocab_high, seed_offset=7)
        for cache in (False, True):
            outs = {}
            for path in ("off", "uncaptured", "graphs", "compile"):
                try:
                    seq, st, _ = T.run_one(model, args, ids, mask, cache=cache, reuse=None, path=path, new_tokens=64)
                    outs[path] = (seq, st["forwards"])
                except Exception as e:
                    print("FAIL", dtype, batch, cache, path, type(e).__name__, str(e)[:200], flush=True)
            ref = outs.get("off")
            for p, (seq, f) in outs.items():
                print(dtype, "b", batch, "cache", cache, p, "vs plain:", T.agreement(seq, ref[0])["token_agreement"],
                      "fwd", f, "vs", ref[1], flush=True)
    del model
    torch.cuda.empty_cache()
