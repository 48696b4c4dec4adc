"""`DllmGenerationLM`: lm-eval's `LM` interface over `load_model` + block-diffusion `generate`.

Model arguments (``--model_args k=v,...``), all optional except ``pretrained``:

| argument | meaning | default |
|---|---|---|
| pretrained, tokenizer, dtype, device, mask_token_id | what `load_model` gets (dtype `reference`: bf16 on compute capability >= 8, fp16 on 7.x, fp32 off CUDA) | -, the checkpoint's, reference, cuda if available |
| protocol | `fork` / `paper`: the reference model class's conventions (below) with that protocol's decoding defaults; `harness`: lm-eval's usual ones | fork |
| threshold, use_block_cache, block_size, small_block_size, max_new_tokens | decoding | the protocol's (fork: 0.9, True, 32, 8, 2048; paper: 1.0, False, 32, 8, 2048) |
| layer_reuse_k, layer_reuse_subset, layer_reuse_size, layer_reuse_layers (`0-1-5`), layer_reuse_mode | layer reuse (k=1: none); size is a count (12) or a share of the layers (0.5, `3/7`) | 1, first, 12/28 of the layers (12 of 28, 6 of 14), -, output |
| loglikelihood_forward | `reference` or `masked_continuation` (see `dllm_generation.scoring`) | reference |
| fast_path | on / off / graphs / compile | on |

Conventions of `fork`/`paper` (the reference model class, Fast-dLLM v2 ``eval.py``): GSM8K and MATH
prompts get "Answer:" / "Solution:" replaced by the boxed-answer instruction; the request's stop
strings and ``max_gen_toks`` are not applied (EOS ends a row; the budget ends on a block boundary);
requests are sorted by prompt length and batched by ``batch_size``. Under `harness` the prompt is
used as given, and generation is cut at the first stop string and at ``max_gen_toks``.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import time
from fractions import Fraction

from lm_eval.api.model import LM
from lm_eval.api.registry import register_model

from ..reuse.config import DEFAULT_REUSE_SIZE, SIZE_RULE

from ..eval.model_calls import generate_batch, loglikelihood_batch
from ..eval.prompts import encode_pair
from ..eval.protocols import LOGLIKELIHOOD_FORWARDS, reference_budget, reference_rewrite

logger = logging.getLogger(__name__)

MODEL_NAME = "dllm_generation"
ADAPTER_PROTOCOLS = ("fork", "paper", "harness")
_DECODING_DEFAULTS = {
    "fork": {"threshold": 0.9, "use_block_cache": True},
    "paper": {"threshold": 1.0, "use_block_cache": False},
    "harness": {"threshold": 0.9, "use_block_cache": True},
}


def _reuse_size(value) -> int | float:
    """`layer_reuse_size` as lm-eval passes it (12, 0.5 or the text "3/7"): a count or a share of the layers."""
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return value
    text = str(value).strip()
    try:
        return int(text)
    except ValueError:
        pass
    try:
        return float(Fraction(text))
    except (ValueError, ZeroDivisionError):
        raise ValueError(f"layer_reuse_size={value!r} is not a number (allowed: {SIZE_RULE})") from None


def _flag(name: str, value) -> bool:
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text in ("true", "1", "yes"):
        return True
    if text in ("false", "0", "no"):
        return False
    raise ValueError(f"{name}={value!r} is not a boolean (allowed: true, false)")


@register_model(MODEL_NAME)
class DllmGenerationLM(LM):
    """Block-diffusion decoding (with optional layer reuse) behind lm-eval's generate_until / loglikelihood."""

    def __init__(self, pretrained: str, tokenizer: str | None = None, dtype: str = "reference",
                 device: str | None = None, batch_size=1, max_batch_size=None, mask_token_id: int | None = None,
                 protocol: str = "fork", threshold: float | None = None, use_block_cache=None,
                 block_size: int = 32, small_block_size: int = 8, max_new_tokens: int = 2048,
                 layer_reuse_k: int = 1, layer_reuse_subset: str = "first", layer_reuse_size: int | float | str = DEFAULT_REUSE_SIZE,
                 layer_reuse_layers=None, layer_reuse_mode: str = "output",
                 loglikelihood_forward: str = "reference", fast_path: str = "on", **unknown):
        super().__init__()
        if unknown:
            raise ValueError(f"{MODEL_NAME}: unknown model_args {sorted(unknown)} (allowed: see "
                             "dllm_generation.lmeval.adapter's table: pretrained, threshold, layer_reuse_k, ...)")
        if protocol not in ADAPTER_PROTOCOLS:
            raise ValueError(f"protocol={protocol!r} is not allowed (allowed: {', '.join(ADAPTER_PROTOCOLS)})")
        if loglikelihood_forward not in LOGLIKELIHOOD_FORWARDS:
            raise ValueError(f"loglikelihood_forward={loglikelihood_forward!r} is not allowed "
                             f"(allowed: {', '.join(LOGLIKELIHOOD_FORWARDS)})")
        if str(batch_size).startswith("auto"):
            raise ValueError("batch_size=auto is not supported (allowed: a positive integer)")
        from ..eval.options import EvalOptions

        defaults = _DECODING_DEFAULTS[protocol]
        layers = None
        if layer_reuse_layers not in (None, ""):
            layers = [int(i) for i in str(layer_reuse_layers).replace(" ", "").split("-")]
        # EvalOptions validates every field (one-line errors naming the field) before anything loads.
        self.options = EvalOptions(
            task="gsm8k", protocol="custom", model=pretrained, tokenizer=tokenizer, dtype=dtype, device=device,
            mask_token_id=mask_token_id, k=int(layer_reuse_k), subset=layer_reuse_subset, size=_reuse_size(layer_reuse_size),
            layers=layers, mode=layer_reuse_mode, block_size=int(block_size), small_block_size=int(small_block_size),
            threshold=float(defaults["threshold"] if threshold is None else threshold),
            use_block_cache=_flag("use_block_cache", defaults["use_block_cache"] if use_block_cache is None
                                  else use_block_cache),
            fast_path=fast_path, max_new_tokens=int(max_new_tokens), batch_size=int(batch_size),
            loglikelihood_forward=loglikelihood_forward,
        ).validate()
        self.protocol = protocol
        from ..eval.metrics.ifeval import seed_language_detection

        seed_language_detection()  # IFEval's language checks score the same response the same way in every run
        self._rank, self._world_size, self.accelerator = 0, 1, None
        if int(os.environ.get("WORLD_SIZE", "1")) > 1:
            import accelerate

            self.accelerator = accelerate.Accelerator()
            self._rank, self._world_size = self.accelerator.process_index, self.accelerator.num_processes
            if device is None and self.accelerator.device.type == "cuda":
                device = str(self.accelerator.device)
        from ..eval.model_calls import build_generation_config, check_device, load_model_and_tokenizer

        import torch

        device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        check_device(dataclasses.replace(self.options, device=device))  # before the model loads
        self.model, self.tokenizer = load_model_and_tokenizer(self.options, device)
        self.generation_config = build_generation_config(self.options, self.tokenizer)
        self.throughput = {"generated_tokens": 0, "model_seconds": 0.0, "reference_tokens": 0, "loop_seconds": 0.0,
                           "fast_path_ran": set()}

    # ------------------------------------------------------------------ lm-eval plumbing
    @property
    def tokenizer_name(self) -> str:
        return str(self.options.tokenizer or self.options.model).replace("/", "__")

    def chat_template(self, chat_template=False):
        return getattr(self.tokenizer, "chat_template", None)

    def apply_chat_template(self, chat_history: list[dict], add_generation_prompt: bool = True) -> str:
        return self.tokenizer.apply_chat_template(chat_history, add_generation_prompt=add_generation_prompt,
                                                  tokenize=False)

    def get_model_info(self) -> dict:
        tp = dict(self.throughput, fast_path_ran=sorted(self.throughput["fast_path_ran"]))
        tp["tokens_per_second"] = (tp["generated_tokens"] / tp["model_seconds"]) if tp["model_seconds"] else None
        tp["reference_tokens_per_s"] = (tp["reference_tokens"] / tp["loop_seconds"]) if tp["loop_seconds"] else None
        return {"dllm_generation": {"protocol": self.protocol, "options": self.options.to_dict(), "throughput": tp}}

    # ------------------------------------------------------------------ requests
    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        reference = self.protocol != "harness"
        prompts = []
        for req in requests:
            context, gen_kwargs = req.args[0], dict(req.args[1] or {})
            if reference:
                context = reference_rewrite(req.task_name or "", context)
            prompts.append((context, gen_kwargs))
        order = sorted(range(len(prompts)), key=lambda i: len(prompts[i][0]))
        out: list[str | None] = [None] * len(prompts)
        size = self.options.batch_size
        from tqdm.auto import tqdm

        for lo in tqdm(range(0, len(order), size), disable=disable_tqdm or self.rank != 0, desc="dllm_generation"):
            idx = order[lo: lo + size]
            began = time.perf_counter()
            ids = [self.tokenizer(prompts[i][0])["input_ids"] for i in idx]
            if reference:
                longest = max(len(p) for p in ids)
                budgets = [reference_budget(longest, self.options.max_new_tokens, self.options.block_size)
                           + longest - len(p) for p in ids]
            else:
                budgets = [int(prompts[i][1].get("max_gen_toks", self.options.max_new_tokens)) for i in idx]
            result = generate_batch(self.model, self.tokenizer, ids, self.generation_config, budgets)
            for i, text in zip(idx, result.texts):
                if not reference:
                    text = _cut_at_stops(text, prompts[i][1].get("until"))
                out[i] = text
            stats = result.stats
            self.throughput["generated_tokens"] += int(stats.get("generated_tokens") or 0)
            self.throughput["model_seconds"] += float(stats.get("wall_seconds") or 0.0)
            self.throughput["reference_tokens"] += int(stats.get("reference_tokens") or 0)
            self.throughput["loop_seconds"] += time.perf_counter() - began
            if stats.get("fast_path"):
                self.throughput["fast_path_ran"].add(str(stats["fast_path"]))
        for i, req in enumerate(requests):
            self.cache_hook.add_partial("generate_until", req.args, out[i])
        return out

    def loglikelihood(self, requests, disable_tqdm: bool = False) -> list[tuple[float, bool]]:
        contexts, conts = [], []
        for req in requests:
            context, continuation = req.args[0], req.args[1]
            c, x = encode_pair(self.tokenizer, context, continuation)
            if not c or not x:
                raise ValueError(f"{MODEL_NAME}: a loglikelihood request needs a non-empty context and continuation "
                                 f"(got context {context[:40]!r}, continuation {continuation!r})")
            contexts.append(c)
            conts.append(x)
        lls, _ = loglikelihood_batch(self.model, contexts, conts, self.options.batch_size,
                                     forward=self.options.loglikelihood_forward,
                                     eos_token_id=self.tokenizer.eos_token_id, block_size=self.options.block_size)
        # is_greedy is not computed (the reference returns False too); `acc` needs only the loglikelihood.
        return [(ll, False) for ll in lls]

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False):
        raise NotImplementedError(
            f"{MODEL_NAME} does not support loglikelihood_rolling (perplexity tasks such as wikitext): "
            "a block-diffusion model has no left-to-right rolling likelihood; use generate_until or "
            "loglikelihood (multiple-choice) tasks"
        )


def _cut_at_stops(text: str, until) -> str:
    """lm-eval's convention: cut the generation at the first occurrence of any stop string."""
    if isinstance(until, str):
        until = [until]
    for stop in until or []:
        if stop:
            text = text.split(stop)[0]
    return text
