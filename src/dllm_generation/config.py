"""Decoding settings: the diffusion fields read from a `GenerationConfig`, merged and validated.

Everything is validated here, before any compute, with messages that name the field and the
allowed values; `layer_reuse` is validated by `LayerReuseConfig` (reuse/config.py), re-exported
here for code that imported it from this module.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from enum import Enum

from .reuse.config import LayerReuseConfig, no_reuse

__all__ = ["DIFFUSION_DEFAULTS", "FAST_PATH_VALUES", "DiffusionSettings", "FastPath", "LayerReuseConfig",
           "resolve_settings", "validate_block_sizes", "validate_fast_path", "validate_threshold"]

logger = logging.getLogger(__name__)

# Fields this library adds to GenerationConfig, with their defaults.
DIFFUSION_DEFAULTS = {
    "block_size": 32,
    "small_block_size": 8,
    "threshold": 0.9,
    "use_block_cache": True,
    "layer_reuse": None,
    "mask_token_id": None,
    # None/True: the graphed engine where it can serve the call, else the eager one; False: the
    # eager engine; or an explicit `FastPath` mode (see engines/selection.py).
    "fast_path": None,
}


class FastPath(str, Enum):
    """Explicit `fast_path` modes: the graphed engine, captured, captured with torch.compile, or
    its passes run without capture (any device)."""

    GRAPHS = "graphs"
    COMPILE = "compile"
    UNCAPTURED = "uncaptured"


FAST_PATH_VALUES = (None, True, False, *(mode.value for mode in FastPath))


def validate_fast_path(value) -> None:
    if isinstance(value, FastPath):
        value = value.value
    if value not in FAST_PATH_VALUES or (isinstance(value, int) and not isinstance(value, bool)):
        raise ValueError(f"fast_path must be one of {list(FAST_PATH_VALUES)}, got {value!r}")


def validate_block_sizes(block_size, small_block_size) -> None:
    for name, value in (("block_size", block_size), ("small_block_size", small_block_size)):
        if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
            raise ValueError(f"{name}={value!r} is out of range (allowed: a positive integer)")
    if block_size % small_block_size:
        raise ValueError(
            f"small_block_size={small_block_size} must divide block_size={block_size} "
            "(allowed: a divisor of block_size, e.g. 8 for 32)"
        )


def validate_threshold(threshold) -> None:
    if isinstance(threshold, bool) or not isinstance(threshold, (int, float)) or not 0 < threshold <= 1:
        raise ValueError(f"threshold={threshold!r} is out of range (allowed: 0 < threshold <= 1)")


@dataclass(frozen=True)
class DiffusionSettings:
    """The validated knobs one `generate` call runs with."""

    max_new_tokens: int
    block_size: int
    small_block_size: int
    threshold: float
    use_block_cache: bool
    mask_token_id: int
    eos_token_ids: tuple[int, ...]
    pad_token_id: int
    do_sample: bool
    temperature: float
    top_p: float
    layer_reuse: LayerReuseConfig | None
    reuse_layers: tuple[int, ...] = field(default=())
    fast_path: bool | str | None = None

    @property
    def sub_blocks_per_block(self) -> int:
        return self.block_size // self.small_block_size

    @property
    def recalling_layers(self) -> tuple[int, ...]:
        """The reuse target layers where reuse can recall; () without reuse or with a schedule that
        always computes (k=1), which decodes exactly as no reuse: nothing to decide or store."""
        if no_reuse(self.layer_reuse):
            return ()
        return tuple(self.reuse_layers)


def _first_set(*values):
    for v in values:
        if v is not None:
            return v
    return None


def _as_id_tuple(value) -> tuple[int, ...]:
    if value is None:
        return ()
    if isinstance(value, (list, tuple)):
        return tuple(int(v) for v in value)
    if hasattr(value, "tolist"):
        v = value.tolist()
        return tuple(int(x) for x in (v if isinstance(v, list) else [v]))
    return (int(value),)


def mask_token_id_of(call_config, model_config_defaults, model_config) -> int | None:
    """The mask id a decode uses: the call's, else the model's generation config's, else `config.mask_token_id`."""
    return _first_set(getattr(call_config, "mask_token_id", None), getattr(model_config_defaults, "mask_token_id", None),
                      getattr(model_config, "mask_token_id", None))


def resolve_settings(
    call_config, model_config_defaults, model_config, *, num_layers: int, input_length: int = 0
) -> DiffusionSettings:
    """Merge the call's GenerationConfig with the model's defaults and validate every field.

    Token ids (mask, eos, pad) and the block size fall back to the model's generation config and
    `config.bd_size`. Sampling is on only when the call's config sets `do_sample=True` with a
    positive temperature: the AR sampling defaults that checkpoints ship are not inherited.
    """

    def get(name):
        return _first_set(getattr(call_config, name, None), getattr(model_config_defaults, name, None))

    block_size = _first_set(getattr(call_config, "block_size", None), getattr(model_config_defaults, "block_size", None),
                            getattr(model_config, "bd_size", None), DIFFUSION_DEFAULTS["block_size"])
    small = _first_set(getattr(call_config, "small_block_size", None), getattr(model_config_defaults, "small_block_size", None),
                       DIFFUSION_DEFAULTS["small_block_size"])
    threshold = _first_set(getattr(call_config, "threshold", None), getattr(model_config_defaults, "threshold", None),
                           DIFFUSION_DEFAULTS["threshold"])
    use_block_cache = _first_set(getattr(call_config, "use_block_cache", None),
                                 getattr(model_config_defaults, "use_block_cache", None), DIFFUSION_DEFAULTS["use_block_cache"])
    validate_block_sizes(block_size, small)
    validate_threshold(threshold)
    if not isinstance(use_block_cache, bool):
        raise ValueError(f"use_block_cache must be True or False, got {use_block_cache!r}")

    max_new = get("max_new_tokens")
    if max_new is None and getattr(call_config, "max_length", None) is not None:
        max_new = int(call_config.max_length) - int(input_length)
    if max_new is None:
        logger.warning("neither max_new_tokens nor max_length is set: decoding one block (%d tokens)", block_size)
        max_new = block_size
    if isinstance(max_new, bool) or not isinstance(max_new, int) or max_new <= 0:
        raise ValueError(f"max_new_tokens must be a positive integer, got {max_new!r}")

    mask_id = mask_token_id_of(call_config, model_config_defaults, model_config)
    if mask_id is None:
        raise ValueError(
            "mask_token_id is not set: pass GenerationConfig(mask_token_id=...), load the model with a tokenizer that "
            "has the '|<MASK>|' token, or set config.mask_token_id"
        )
    eos = _as_id_tuple(get("eos_token_id"))
    pad = get("pad_token_id")
    if pad is None:
        pad = eos[0] if eos else int(mask_id)
    vocab = getattr(model_config, "vocab_size", None)
    if vocab is not None and not (0 <= int(mask_id) < vocab):
        raise ValueError(f"mask_token_id {mask_id} is outside the vocabulary (0..{vocab - 1})")

    do_sample = bool(getattr(call_config, "do_sample", False))
    temperature = getattr(call_config, "temperature", None)
    temperature = 0.0 if temperature is None else float(temperature)
    top_p = getattr(call_config, "top_p", None)
    top_p = 1.0 if top_p is None else float(top_p)
    if do_sample and not (math.isfinite(temperature) and temperature >= 0):  # NaN compares False to everything
        raise ValueError(f"temperature must be a finite number >= 0 when sampling, got {temperature}")
    if not (0 < top_p <= 1):
        raise ValueError(f"top_p must be in (0, 1], got {top_p}")
    if do_sample and temperature == 0:
        do_sample = False
    num_beams = getattr(call_config, "num_beams", None)
    if num_beams not in (None, 1):
        raise ValueError(f"num_beams must be 1 for block-diffusion decoding, got {num_beams}")
    nrs = getattr(call_config, "num_return_sequences", None)
    if nrs not in (None, 1):
        raise ValueError(f"num_return_sequences must be 1 for block-diffusion decoding, got {nrs}")

    fast_path = _first_set(getattr(call_config, "fast_path", None), getattr(model_config_defaults, "fast_path", None))
    validate_fast_path(fast_path)
    if isinstance(fast_path, FastPath):
        fast_path = fast_path.value

    reuse = LayerReuseConfig.coerce(_first_set(getattr(call_config, "layer_reuse", None),
                                               getattr(model_config_defaults, "layer_reuse", None)))
    reuse_layers = reuse.resolve_layers(num_layers) if reuse is not None else ()
    return DiffusionSettings(
        max_new_tokens=int(max_new),
        block_size=int(block_size),
        small_block_size=int(small),
        threshold=float(threshold),
        use_block_cache=use_block_cache,
        mask_token_id=int(mask_id),
        eos_token_ids=eos,
        pad_token_id=int(pad),
        do_sample=do_sample,
        temperature=temperature if do_sample else 0.0,
        top_p=top_p,
        layer_reuse=reuse,
        reuse_layers=reuse_layers,
        fast_path=fast_path,
    )
