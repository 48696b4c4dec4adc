"""The shipped demo model: a 14-layer Qwen2 block-diffusion model trained on `arith`.

Load it with `load_model("demo")`; retrain it with `python -m dllm_generation.demo.train`.
"""
