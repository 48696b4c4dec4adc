"""`BlockDiffusionGenerationMixin`: `generate` that decodes by block diffusion.

It accepts ordinary HF inputs (left- or right-padded `input_ids` + `attention_mask`), validates
every diffusion field before any compute, strips padding into per-row prompts, runs
`BlockDiffusionDecoder`, and returns what HF `generate` returns: a tensor, or a
`GenerateDecoderOnlyOutput` (with `stats`) when `return_dict_in_generate=True`.

What block diffusion cannot honour is refused, as transformers refuses arguments a model does
not use: logits processors, stopping criteria, constrained or assisted decoding, repetition
penalties, extra outputs. Decoding picks tokens for many positions at once from one forward, so
token-by-token hooks have nothing to act on. Such settings inherited from the model's own
generation config (an instruct checkpoint's sampling defaults) are ignored with a warning.
"""

from __future__ import annotations

import copy
import logging
from dataclasses import dataclass
from typing import Any

import torch
from transformers import GenerationConfig
from transformers.generation.utils import GenerateDecoderOnlyOutput

from .config import DIFFUSION_DEFAULTS, resolve_settings
from .decoding import BlockDiffusionDecoder, plan_layout
from .engines.selection import select_engine
from .runner import LayerStackRunner


logger = logging.getLogger(__name__)

# generate() arguments of transformers' token-by-token decoding; any value but these is refused.
UNSUPPORTED_ARGUMENTS = {
    "logits_processor": None, "stopping_criteria": None, "prefix_allowed_tokens_fn": None, "assistant_model": None,
    "assistant_tokenizer": None, "negative_prompt_ids": None, "negative_prompt_attention_mask": None,
    "synced_gpus": False, "past_key_values": None, "cache": None, "custom_generate": None, "position_ids": None,
    "token_type_ids": None,
}
# Accepted and without effect here: transformers passes `tokenizer` for stop strings (refused below).
NEUTRAL_ARGUMENTS = ("use_cache", "tokenizer")
# GenerationConfig fields that would change the output, with the value that means "off".
UNSUPPORTED_FIELDS = {
    "repetition_penalty": 1.0, "encoder_repetition_penalty": 1.0, "no_repeat_ngram_size": 0,
    "encoder_no_repeat_ngram_size": 0, "bad_words_ids": None, "force_words_ids": None, "suppress_tokens": None,
    "begin_suppress_tokens": None, "sequence_bias": None, "constraints": None, "forced_bos_token_id": None,
    "forced_eos_token_id": None, "exponential_decay_length_penalty": None, "min_length": 0, "min_new_tokens": 0,
    "stop_strings": None, "max_time": None, "guidance_scale": 1.0, "watermarking_config": None,
    "penalty_alpha": None, "dola_layers": None, "diversity_penalty": 0.0, "num_beam_groups": 1,
    "prompt_lookup_num_tokens": None, "output_scores": False, "output_logits": False, "output_attentions": False,
    "output_hidden_states": False, "token_healing": False, "renormalize_logits": False,
}
# Sampling filters: used only when sampling (as in transformers); top_p is honoured.
UNSUPPORTED_SAMPLING_FIELDS = {"top_k": 0, "min_p": None, "top_h": None, "typical_p": 1.0, "epsilon_cutoff": 0.0,
                               "eta_cutoff": 0.0}


_WARNED: set = set()  # inherited-field warnings already given (once per process)


def _is_set(value, off) -> bool:
    if value is None or value is off or value == off:
        return False
    return not (isinstance(value, (list, tuple, dict)) and not value)


def check_token_ids(rows: list[list[int]], vocab_size: int, what: str = "input_ids") -> None:
    """Every id must index the embedding table: checked on the host before any forward (an id
    outside it is an IndexError on the CPU and a device-side assert on CUDA)."""
    for i, row in enumerate(rows):
        bad = [t for t in row if not 0 <= t < vocab_size]
        if bad:
            raise ValueError(
                f"{what} row {i} holds token id {bad[0]} outside the model's vocabulary (allowed: 0..{vocab_size - 1}); "
                "was it made by another model's tokenizer?"
            )


def check_no_mask_token(rows: list[list[int]], mask_token_id: int, what: str = "input_ids") -> None:
    """The prompt is the caller's and is never rewritten, but the decoder finds the positions to
    generate by the mask id: a mask id inside a prompt would be decoded over. Refused instead."""
    for i, row in enumerate(rows):
        if mask_token_id in row:
            raise ValueError(
                f"{what} row {i} holds the mask token id {mask_token_id} at position {row.index(mask_token_id)} "
                f"(allowed: any id but {mask_token_id}; the decoder would overwrite it); a text containing the "
                "tokenizer's mask token (|<MASK>|) encodes to it: remove or escape that string"
            )


def _requested_max_length(generation_config, kwargs: dict):
    """The `max_length` this call asks for, or None when `max_new_tokens` decides (transformers' rule:
    max_new_tokens takes precedence when both are given). A call's max_length outranks the model's
    own max_new_tokens default; GenerationConfig's default max_length (20) is not a request."""
    if kwargs.get("max_length") is not None:
        new = kwargs.get("max_new_tokens", getattr(generation_config, "max_new_tokens", None))
        if new is not None:
            logger.warning("both max_new_tokens (%s) and max_length (%s) are set: max_new_tokens takes precedence",
                           new, kwargs["max_length"])
            return None
        return kwargs["max_length"]
    if generation_config is not None and getattr(generation_config, "max_new_tokens", None) is None:
        length = getattr(generation_config, "max_length", None)
        if length is not None and length != GenerationConfig().max_length:
            return length
    return None


@dataclass
class BlockDiffusionGenerateOutput(GenerateDecoderOnlyOutput):
    """HF's decoder-only output plus the decode's run statistics."""

    stats: dict[str, Any] | None = None


class BlockDiffusionGenerationMixin:
    """Mix in before a transformers causal-LM class to make `generate` block-diffusion decoding."""

    last_generation_stats: dict[str, Any] | None = None

    def _check_generation_fields(self, call_config, *, explicit: bool, kwargs: dict) -> None:
        """Refuse output-changing fields the caller set; ignore (with a warning) those that only the
        model's own generation config carries."""
        fields = dict(UNSUPPORTED_FIELDS)
        sampling = bool(getattr(call_config, "do_sample", False)) and (getattr(call_config, "temperature", None) or 0) > 0
        if sampling:
            fields.update(UNSUPPORTED_SAMPLING_FIELDS)
        found = {name: getattr(call_config, name, None) for name, off in fields.items()
                 if _is_set(getattr(call_config, name, None), off)}
        given = {name: v for name, v in found.items() if explicit or name in kwargs}
        if given:
            raise ValueError(
                "generation settings block-diffusion decoding cannot honour: "
                + ", ".join(f"{name}={value!r}" for name, value in sorted(given.items()))
                + " (supported: max_new_tokens/max_length, do_sample, temperature, top_p, eos/pad ids and the "
                "diffusion fields); remove them"
            )
        inherited = tuple(sorted(set(found) - set(given)))
        if inherited and inherited not in _WARNED:
            _WARNED.add(inherited)
            logger.warning("ignoring the model's generation_config fields %s: block-diffusion decoding does not use them",
                           ", ".join(f"{n}={found[n]!r}" for n in inherited))

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
        refused = sorted(name for name, off in UNSUPPORTED_ARGUMENTS.items()
                         if name in model_kwargs and _is_set(model_kwargs.pop(name), off))
        for name in NEUTRAL_ARGUMENTS:
            model_kwargs.pop(name, None)
        refused += sorted(model_kwargs)
        if refused:
            raise ValueError(
                f"generate got arguments block-diffusion decoding cannot honour: {', '.join(refused)} (it commits many "
                "tokens per forward, so token-by-token processors, criteria and cache inputs have nothing to act on)"
            )
        self._check_generation_fields(call_config, explicit=generation_config is not None, kwargs=kwargs)
        if input_ids is None:
            raise ValueError("input_ids must be given")
        if not isinstance(input_ids, torch.Tensor):
            raise ValueError(f"input_ids must be a tensor of token ids, got {type(input_ids).__name__} "
                             "(allowed: a torch integer tensor, e.g. tokenizer(..., return_tensors='pt'))")
        if input_ids.dtype == torch.bool or input_ids.dtype.is_floating_point or input_ids.dtype.is_complex:
            raise ValueError(f"input_ids dtype {input_ids.dtype} is not allowed (allowed: an integer dtype, "
                             "e.g. torch.long): token ids are whole numbers")
        if input_ids.dim() == 1:
            input_ids = input_ids[None]
        if input_ids.dim() != 2:
            raise ValueError(f"input_ids has {input_ids.dim()} dimensions, shape {tuple(input_ids.shape)} "
                             "(allowed: 2, (batch, length), or 1 for a single prompt)")
        if input_ids.shape[0] == 0:
            raise ValueError("input_ids is an empty batch: give at least one prompt")
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        if attention_mask.shape != input_ids.shape:
            raise ValueError(f"attention_mask shape {tuple(attention_mask.shape)} != input_ids shape {tuple(input_ids.shape)}")
        max_length = _requested_max_length(generation_config, kwargs)
        if max_length is not None:  # as transformers: the total length, counted from the (padded) input width
            if isinstance(max_length, bool) or not isinstance(max_length, int) or max_length <= input_ids.shape[1]:
                raise ValueError(f"max_length={max_length!r} leaves no room for new tokens after the "
                                 f"{input_ids.shape[1]}-token input (allowed: an integer > {input_ids.shape[1]}, "
                                 "or max_new_tokens)")
            call_config.max_new_tokens = max_length - input_ids.shape[1]

        runner = LayerStackRunner(self)
        settings = resolve_settings(call_config, self.generation_config, self.config,
                                    num_layers=runner.num_layers, input_length=input_ids.shape[1])
        prompts = [row[m.bool()].tolist() for row, m in zip(input_ids.cpu(), attention_mask.cpu())]
        for i, p in enumerate(prompts):
            if not p:
                raise ValueError(f"input_ids row {i} is empty after removing padding (attention_mask is all 0)")
        check_token_ids(prompts, runner.embed.num_embeddings)
        check_no_mask_token(prompts, settings.mask_token_id)
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

        engine, fallback = select_engine(self, runner, settings, batch=len(prompts),
                                         capacity=layout.capacity_blocks * settings.block_size, generator=generator)
        decoder = BlockDiffusionDecoder(runner, settings, engine=engine, on_block=on_block)
        outputs = decoder.decode(prompts)
        if streamer is not None:
            streamer.end()
        stats = decoder.stats.as_dict()
        stats["reuse_layers"] = list(settings.reuse_layers)
        stats["batch_size"] = len(prompts)
        stats["fast_path"] = fallback if fallback is not None else engine.describe()
        self.last_generation_stats = stats

        width = max(len(o) for o in outputs)
        new = torch.full((len(outputs), width), settings.pad_token_id, dtype=torch.long)
        for r, o in enumerate(outputs):
            new[r, : len(o)] = torch.tensor(o, dtype=torch.long)
        sequences = torch.cat([input_ids, new.to(input_ids.device)], dim=1)
        if getattr(call_config, "return_dict_in_generate", False):
            return BlockDiffusionGenerateOutput(sequences=sequences, stats=stats)
        return sequences
