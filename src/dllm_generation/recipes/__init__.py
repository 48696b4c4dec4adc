"""Recipes: pretrained autoregressive LMs converted to block diffusion by this library's own trainer.

`smollm2` turns SmolLM2-135M-Instruct (a Llama model of 30 layers) into a block-diffusion model, and
fine-tunes the same parent autoregressively as the baseline it is compared with. What ships is the
difference (a LoRA adapter and the mask-token row), merged into the base weights at load time.
"""
