"""Every place the evaluation touches the model: loading, generating a batch, scoring choices.

Keeping the model behind these few functions lets the run loop, resume and artifacts be
tested with a fake model, and makes the timing rules obvious: the clock runs around the model
call only (device synchronised on both sides), never around tokenisation or scoring.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field

import torch

from .data import one_line
from .options import InvalidOptionError

logger = logging.getLogger(__name__)

# Counters summed over batches; every other throughput number is derived from these.
COUNTERS = ("forwards", "denoising_steps", "generated_tokens", "layer_calls", "layer_calls_skipped", "tokens")


class ModelUnavailableError(RuntimeError):
    """The checkpoint or tokenizer could not be loaded; the message says what was tried."""


@dataclass
class BatchResult:
    texts: list[str]
    token_counts: list[int]
    stats: dict = field(default_factory=dict)
    # Tokens as the reference model class counts them: every non-mask slot after the prompt, i.e.
    # through the end of the block holding EOS (post-EOS padding included), see `reference_token_count`.
    reference_token_counts: list[int] = field(default_factory=list)


def load_model_and_tokenizer(options, device: str | None):
    """`dllm_generation.load_model` with errors that say what was tried and how to fix it.

    The checkpoint's config.json is read first, so settings that do not fit the model (a reuse
    size beyond its depth) are refused before any weights are read.
    """
    from dllm_generation import load_model
    from dllm_generation.loading import config_from_hub_dict, locate_pretrained, read_config_dict, resolve_pretrained

    dtype = options.dtype
    if dtype == "reference":
        from .protocols import reference_dtype

        dtype = reference_dtype(device)
    dtype = None if dtype in ("auto", None) else dtype
    if dtype is None and str(device or "cpu").startswith("cpu"):
        dtype = "float32"  # half-precision matmuls on a CPU are slow and round more: auto means float32 there
    kwargs = {"dtype": dtype, "device": device, "mask_token_id": options.mask_token_id}
    if options.tokenizer:
        kwargs["tokenizer"] = options.tokenizer
    try:
        try:  # the depth, before any weights are read (or hashed)
            config, _ = config_from_hub_dict(read_config_dict(locate_pretrained(options.model)))
        except (OSError, ValueError):
            resolve_pretrained(options.model)  # a damaged folder's checksum error names the file
            raise
        check_layer_reuse(options, config.num_hidden_layers)
        model, tokenizer = load_model(options.model, **kwargs)  # verifies a folder's SHA256SUMS, once
    except InvalidOptionError:
        raise
    except (OSError, ValueError, RuntimeError) as err:
        raise ModelUnavailableError(
            f"cannot load model {options.model!r} (dtype={options.dtype}, device={device}): "
            f"{type(err).__name__}: {one_line(err)}. Pass a local checkpoint folder with --model PATH "
            "(set HF_HUB_OFFLINE=1 on machines without internet)"
        ) from err
    if tokenizer is None:
        raise ModelUnavailableError(
            f"model {options.model!r} loaded but has no tokenizer files; pass --tokenizer PATH "
            "(a folder with vocab.json/merges.txt or tokenizer.json)"
        )
    return model, tokenizer


def model_device(model) -> torch.device:
    return next(model.parameters()).device


def check_device(options) -> None:
    """Refuse a device this machine does not have, or a fast path the device cannot run, before
    anything is read or loaded."""
    device = options.device
    if options.fast_path in ("graphs", "compile"):
        runs_on = device or ("cuda" if torch.cuda.is_available() else "cpu")
        if not runs_on.startswith("cuda"):
            raise InvalidOptionError(
                f"fast_path={options.fast_path!r} needs a CUDA device (this run's device is {runs_on!r}; "
                "allowed here: on, off)")
    if not device or not device.startswith("cuda"):
        return
    if not torch.cuda.is_available():
        raise InvalidOptionError(
            f"device={device!r} is not available: this torch ({torch.__version__}) sees no CUDA device (allowed here: cpu)"
        )
    index = torch.device(device).index
    if index is not None and index >= torch.cuda.device_count():
        raise InvalidOptionError(
            f"device={device!r} is not available (allowed: cuda:0..cuda:{torch.cuda.device_count() - 1}, cpu)"
        )


def reuse_config(options):
    """The `LayerReuseConfig` of `options`; None where it never recalls (k=1, per_layer with every
    period 1, ...: plain decoding, no reuse at all), by the library's one rule (`no_reuse`)."""
    from dllm_generation.reuse import no_reuse

    config = options.layer_reuse()
    return None if no_reuse(config) else config


def check_layer_reuse(options, num_layers: int) -> None:
    """Refuse a reuse size or layer list the model's depth cannot hold (InvalidOptionError)."""
    reuse = reuse_config(options)
    if reuse is None:
        return
    try:
        reuse.resolve_layers(int(num_layers))
    except ValueError as err:
        flag = "--layers" if options.layers is not None else "--size"
        raise InvalidOptionError(f"{err} (model {options.model!r}; set {flag})") from None


def check_model_fits(options, model, tokenizer) -> None:
    """Settings that depend on the loaded model, checked before anything is written or decoded."""
    check_layer_reuse(options, model.config.num_hidden_layers)
    if tokenizer is not None:
        check_tokenizer_fits(options, model, tokenizer)


def check_tokenizer_fits(options, model, tokenizer) -> None:
    """A tokenizer with ids beyond the model's embedding table would fail inside the first forward."""
    rows = model.get_input_embeddings().num_embeddings
    if len(tokenizer) > rows:
        raise ModelUnavailableError(
            f"the tokenizer ({options.tokenizer or options.model!r}) has {len(tokenizer)} tokens but model "
            f"{options.model!r} embeds only ids 0..{rows - 1}: they do not belong together; pass the model's "
            "own tokenizer with --tokenizer"
        )


def build_generation_config(options, tokenizer):
    """The Fast-dLLM v2 decoding settings of `options`; k=1 means no layer reuse at all."""
    from transformers import GenerationConfig

    from .options import FAST_PATH_VALUES

    reuse = reuse_config(options)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    return GenerationConfig(
        max_new_tokens=options.max_new_tokens,
        block_size=options.block_size,
        small_block_size=options.small_block_size,
        threshold=options.threshold,
        use_block_cache=options.use_block_cache,
        fast_path=FAST_PATH_VALUES[options.fast_path],
        layer_reuse=reuse,
        do_sample=False,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=pad,
    )


def generate_batch(model, tokenizer, prompts: list[list[int]], generation_config,
                   budgets: list[int] | None = None) -> BatchResult:
    """Decode one left-padded batch; texts exclude the prompt, special tokens and padding.

    `budgets` cuts each row to its own token budget (the reference's block-aligned budget); the
    batch is decoded with the largest, and a row's tokens do not depend on the others or on later
    blocks, so the cut equals decoding that row with its own budget.
    """
    pad = generation_config.pad_token_id
    device = model_device(model)
    width = max(len(p) for p in prompts)
    input_ids = torch.full((len(prompts), width), pad, dtype=torch.long)
    attention_mask = torch.zeros((len(prompts), width), dtype=torch.long)
    for row, ids in enumerate(prompts):
        input_ids[row, width - len(ids) :] = torch.tensor(ids, dtype=torch.long)
        attention_mask[row, width - len(ids) :] = 1
    input_ids, attention_mask = input_ids.to(device), attention_mask.to(device)

    if budgets is not None:
        generation_config = _with_budget(generation_config, max(budgets))
    with _clock(device) as clock:
        with torch.inference_mode():
            out = model.generate(
                input_ids=input_ids,
                attention_mask=attention_mask,
                generation_config=generation_config,
                return_dict_in_generate=True,
            )
    new = out.sequences[:, width:].tolist()
    if budgets is not None:
        new = [row[:b] for row, b in zip(new, budgets)]
    counts = [sum(1 for t in row if t != pad) for row in new]
    texts = [tokenizer.decode([t for t in row if t != pad], skip_special_tokens=True) for row in new]
    raw = dict(getattr(out, "stats", None) or getattr(model, "last_generation_stats", None) or {})
    stats = {name: raw.get(name, 0) for name in COUNTERS if name != "tokens"}
    # Counted from the rows returned (after any budget cut), so the samples add up to it.
    stats["generated_tokens"] = sum(counts)
    stats["tokens"] = stats["generated_tokens"]
    stats["wall_seconds"] = clock.seconds
    stats["model_wall_seconds"] = raw.get("wall_seconds")
    stats["fast_path"] = fast_path_label(raw.get("fast_path"))
    eos = generation_config.eos_token_id
    eos = set(eos) if isinstance(eos, (list, tuple)) else {eos}
    ref_counts = reference_token_counts([len(p) for p in prompts], new, eos, generation_config.block_size,
                                        budgets or [generation_config.max_new_tokens] * len(prompts))
    stats["reference_tokens"] = sum(ref_counts)
    return BatchResult(texts, counts, stats, ref_counts)


def fast_path_label(reported) -> str | None:
    """What `generate` says decoded the batch (`stats["fast_path"]`), as one string.

    "graphs" / "compile" / "uncaptured" when the graphed engine ran (with what fell back inside it), or the
    plain path's "off (reason)".
    """
    if reported is None or isinstance(reported, str):
        return reported
    label = reported.get("mode")
    if reported.get("compile_failure"):
        label += " (torch.compile failed: uncompiled layers)"
    if reported.get("graph_failure"):
        label += " (graph capture failed: uncaptured passes)"
    elif reported.get("prefill_failure"):
        label += " (prefill capture failed: eager prefills)"
    return label


def reference_token_counts(prompt_lengths: list[int], rows: list[list[int]], eos: set, block_size: int,
                           budgets: list[int]) -> list[int]:
    """Tokens per row as the reference model class counts them (`generated != mask`, after the prompt).

    Its decoder returns a finished row through the end of the (absolute, block-aligned) block
    holding EOS, post-EOS slots filled with pad, plus one pad token when other rows of the batch
    decode on after that block; a row that never stops returns its whole budget.
    """
    stops = []
    for length, row in zip(prompt_lengths, rows):
        at = next((i for i, t in enumerate(row) if t in eos), None)
        stops.append(None if at is None else ((length + at) // block_size + 1) * block_size - length)
    last_block_end = [None if s is None else length + s for length, s in zip(prompt_lengths, stops)]
    unfinished = any(s is None for s in stops)
    batch_end = max((e for e in last_block_end if e is not None), default=0)
    counts = []
    for s, end, budget in zip(stops, last_block_end, budgets):
        if s is None:
            counts.append(budget)
        else:
            counts.append(s + (1 if len(stops) > 1 and (unfinished or end < batch_end) else 0))
    return counts


def _with_budget(generation_config, max_new_tokens: int):
    import copy

    config = copy.deepcopy(generation_config)
    config.max_new_tokens = max_new_tokens
    return config


def loglikelihood_batch(model, contexts: list[list[int]], continuations: list[list[int]], batch_size: int, *,
                        forward: str = "reference", eos_token_id: int | None = None, block_size: int | None = None):
    """Log-probabilities of each continuation (one masked forward per pair, `forward` variant) and counters."""
    from dllm_generation.scoring import loglikelihood

    device = model_device(model)
    with _clock(device) as clock:
        with torch.inference_mode():
            lls, raw = loglikelihood(model, contexts, continuations, batch_size=batch_size, forward=forward,
                                     eos_token_id=eos_token_id, block_size=block_size)
    stats = {name: int(raw.get(name) or 0) for name in COUNTERS}
    # Throughput counts every token the forwards processed (context + continuation + any padding slots).
    stats["tokens"] = int(raw.get("processed_tokens") or sum(len(c) + len(x) for c, x in zip(contexts, continuations)))
    stats["generated_tokens"] = 0
    stats["wall_seconds"] = clock.seconds
    stats["model_wall_seconds"] = raw.get("wall_seconds")
    return [float(x) for x in lls], stats


class _clock:
    """Wall seconds of the enclosed block, with the accelerator synchronised at both ends."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"
        self.seconds = 0.0

    def __enter__(self):
        if self.cuda:
            torch.cuda.synchronize()
        self._start = time.perf_counter()
        return self

    def __exit__(self, *exc):
        if self.cuda:
            torch.cuda.synchronize()
        self.seconds = time.perf_counter() - self._start
        return False
