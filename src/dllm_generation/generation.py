"""`BlockDiffusionGenerationMixin`: `generate` that decodes by block diffusion.

It accepts ordinary HF inputs (left- or right-padded `input_ids` + `attention_mask`), validates
every diffusion field before any compute, strips padding into per-row prompts, runs
`BlockDiffusionDecoder`, and returns what HF `generate` returns: a tensor, or a
`GenerateDecoderOnlyOutput` (with `stats`) when `return_dict_in_generate=True`.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any

import torch
from transformers import GenerationConfig
from transformers.generation.utils import GenerateDecoderOnlyOutput

from .config import DIFFUSION_DEFAULTS, resolve_settings
from .decoding import BlockDiffusionDecoder, plan_layout
from .fast_path import select_fast_path
from .runner import LayerStackRunner


@dataclass
class BlockDiffusionGenerateOutput(GenerateDecoderOnlyOutput):
    """HF's decoder-only output plus the decode's run statistics."""

    stats: dict[str, Any] | None = None


class BlockDiffusionGenerationMixin:
    """Mix in before a transformers causal-LM class to make `generate` block-diffusion decoding."""

    last_generation_stats: dict[str, Any] | None = None

    def _diffusion_call_config(self, generation_config, kwargs):
        config = copy.deepcopy(generation_config) if generation_config is not None else copy.deepcopy(self.generation_config)
        model_kwargs = {}
        for key, value in kwargs.items():
            if key in DIFFUSION_DEFAULTS or hasattr(config, key):
                setattr(config, key, value)
            else:
                model_kwargs[key] = value
        return config, model_kwargs

    @torch.no_grad()
    def generate(self, inputs: torch.Tensor | None = None, generation_config: GenerationConfig | None = None,
                 streamer=None, **kwargs):
        call_config, model_kwargs = self._diffusion_call_config(generation_config, kwargs)
        input_ids = inputs if inputs is not None else model_kwargs.pop("input_ids", None)
        attention_mask = model_kwargs.pop("attention_mask", None)
        generator = model_kwargs.pop("generator", None)
        for ignored in ("use_cache", "past_key_values", "cache", "logits_processor", "stopping_criteria",
                        "prefix_allowed_tokens_fn", "synced_gpus", "assistant_model", "negative_prompt_ids",
                        "negative_prompt_attention_mask", "tokenizer", "position_ids", "token_type_ids"):
            model_kwargs.pop(ignored, None)
        if model_kwargs:
            raise ValueError(f"generate got unsupported arguments for block-diffusion decoding: {sorted(model_kwargs)}")
        if input_ids is None:
            raise ValueError("input_ids must be given")
        if input_ids.dim() == 1:
            input_ids = input_ids[None]
        if input_ids.shape[0] == 0:
            raise ValueError("input_ids is an empty batch: give at least one prompt")
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        if attention_mask.shape != input_ids.shape:
            raise ValueError(f"attention_mask shape {tuple(attention_mask.shape)} != input_ids shape {tuple(input_ids.shape)}")

        runner = LayerStackRunner(self)
        settings = resolve_settings(call_config, self.generation_config, self.config,
                                    num_layers=runner.num_layers, input_length=input_ids.shape[1])
        prompts = [row[m.bool()].tolist() for row, m in zip(input_ids.cpu(), attention_mask.cpu())]
        for i, p in enumerate(prompts):
            if not p:
                raise ValueError(f"input_ids row {i} is empty after removing padding (attention_mask is all 0)")
        layout = plan_layout([len(p) for p in prompts], settings.block_size, settings.max_new_tokens)
        max_pos = getattr(self.config, "max_position_embeddings", None)
        if max_pos is not None:
            worst = max(layout.last_position(r, settings.block_size) for r in range(len(prompts)))
            if worst >= max_pos:
                raise ValueError(
                    f"prompt length plus max_new_tokens ({settings.max_new_tokens}, decoded in whole blocks of "
                    f"{settings.block_size}) needs position {worst}, beyond the model's max_position_embeddings={max_pos}"
                )
        if streamer is not None and len(prompts) > 1:
            raise ValueError("streamer supports batch size 1 only")
        if generator is None and getattr(call_config, "seed", None) is not None:
            generator = torch.Generator(device=runner.device).manual_seed(int(call_config.seed))

        on_block = None
        if streamer is not None:
            streamer.put(torch.tensor(prompts[0]))
            budget = [settings.max_new_tokens]
            stops = set(settings.eos_token_ids)
            done = [False]

            def on_block(_row, new_tokens):
                if done[0]:
                    return
                out = new_tokens[: budget[0]]
                for i, tok in enumerate(out):
                    if tok in stops:
                        out, done[0] = out[: i + 1], True
                        break
                budget[0] -= len(out)
                if out:
                    streamer.put(torch.tensor(out))

        fast, fast_desc = select_fast_path(self, runner, settings, getattr(call_config, "fast_path", None),
                                           batch=len(prompts), capacity=layout.capacity_blocks * settings.block_size)
        decoder = BlockDiffusionDecoder(runner, settings, generator=generator, on_block=on_block, fast_path=fast)
        outputs = decoder.decode(prompts)
        if streamer is not None:
            streamer.end()
        stats = decoder.stats.as_dict()
        stats["reuse_layers"] = list(settings.reuse_layers)
        stats["batch_size"] = len(prompts)
        stats["fast_path"] = fast.describe() if fast is not None else fast_desc
        self.last_generation_stats = stats

        width = max(len(o) for o in outputs)
        new = torch.full((len(outputs), width), settings.pad_token_id, dtype=torch.long)
        for r, o in enumerate(outputs):
            new[r, : len(o)] = torch.tensor(o, dtype=torch.long)
        sequences = torch.cat([input_ids, new.to(input_ids.device)], dim=1)
        if getattr(call_config, "return_dict_in_generate", False):
            return BlockDiffusionGenerateOutput(sequences=sequences, stats=stats)
        return sequences
