"""Decoding settings: `LayerReuseConfig` and the diffusion fields read from a `GenerationConfig`.

Everything is validated here, before any compute, with messages that name the field and the
allowed values. `GenerationConfig` keeps unknown fields as attributes and serialises dataclasses
through their `to_dict`; a reloaded config therefore holds `layer_reuse` as a plain dict, which
`LayerReuseConfig.coerce` rehydrates.
"""

from __future__ import annotations

import json
import logging
import math
from dataclasses import asdict, dataclass, field
from enum import Enum
from typing import Any

logger = logging.getLogger(__name__)

SUBSETS = ("first", "middle", "last")
REUSE_MODES = ("output", "residual")
# How a reuse step is decided: "fixed" recomputes every k steps; "unmask_drift" recomputes once the
# share of the sub-block unmasked since the stored entry exceeds `tolerance`; "per_layer" gives each
# target layer its own period (see reuse_policy.py).
REUSE_POLICIES = ("fixed", "unmask_drift", "per_layer")
# Default reuse size: a share of the model's layers, so one setting fits every depth. 12 of 28
# layers is the published layer-reuse experiment on Fast_dLLM_v2_7B; the same share is 6 of 14.
DEFAULT_REUSE_SIZE = 12 / 28

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

SIZE_RULE = (
    "an integer >= 1 (that many layers) or a float in (0, 1) (that share of the model's layers, "
    "rounded half up, at least 1)"
)


def is_share(size) -> bool:
    """A reuse `size` given as a share of the layers (a float) rather than a count (an int)."""
    return isinstance(size, float)


def validate_size(size, where: str = "LayerReuseConfig.size") -> None:
    """Raise ValueError naming `where` unless `size` is a count (int >= 1) or a share (float in (0, 1))."""
    if (isinstance(size, bool) or not isinstance(size, (int, float))
            or (isinstance(size, int) and size < 1) or (is_share(size) and not 0.0 < size < 1.0)):
        raise ValueError(f"{where}={size!r} is out of range (allowed: {SIZE_RULE})")


def validate_layers(layers, where: str = "LayerReuseConfig.layers") -> list[int]:
    """Explicit reuse layers: a non-empty list of distinct integers >= 0; returned sorted."""
    layers = list(layers)
    if not layers:
        raise ValueError(f"{where} must name at least one layer index (allowed: a non-empty list of indices >= 0)")
    for idx in layers:
        if isinstance(idx, bool) or not isinstance(idx, int) or idx < 0:
            raise ValueError(f"{where}={layers!r} holds {idx!r} (allowed: a non-empty list of layer indices >= 0)")
    dupes = sorted({i for i in layers if layers.count(i) > 1})
    if dupes:
        raise ValueError(f"{where}={layers!r} has duplicate indices {dupes} (allowed: distinct indices)")
    return sorted(layers)


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


def size_label(size) -> str:
    """How a size appears in names: the count, or the share with 3 significant digits (0.429)."""
    return f"{size:.3g}" if is_share(size) else str(size)


@dataclass
class LayerReuseConfig:
    """Recompute `layers` (or a `subset` of `size` layers) only every `k` denoising steps.

    `size`: an int is a count of layers; a float in (0, 1) is a share of the model's layers,
    round(size * num_layers) with halves rounded up, at least 1. The default share 12/28 is the
    published experiment's 12 of Fast_dLLM_v2_7B's 28 layers, and 6 of 14, 2 of 4 elsewhere. The
    subset must leave at least one layer running (checked against the model before any compute).
    `mode="output"`: on a reuse step a target layer returns its stored output for those positions.
    `mode="residual"`: it returns its current input plus the stored (output - input), so tokens
    unmasked since the store still flow through the skipped layer.
    `policy="fixed"` (default): compute at steps 0, k, 2k, ... of every sub-block.
    `policy="unmask_drift"`: compute at step 0, then whenever the share of the sub-block's slots
    unmasked since the stored entry exceeds `tolerance`, or the entry is `max_staleness` steps old.
    `policy="per_layer"`: target layer j computes at steps 0, layer_k[j], 2*layer_k[j], ... (one
    period per target layer, in layer order; all 1 = no reuse, all k = the fixed policy).
    """

    k: int = 1
    subset: str | None = "first"
    # An int is a count of layers; a float in (0, 1) a share of the model's layers (see resolve_layers).
    size: int | float = DEFAULT_REUSE_SIZE
    layers: list[int] | None = None
    mode: str = "output"
    policy: str = "fixed"
    # unmask_drift only: the largest share of the sub-block unmasked since the stored entry that still
    # allows a recall (0 = never recall; every step unmasks at least one token).
    tolerance: float | None = None
    # unmask_drift only: recompute once the stored entry is this many steps old (None = no limit).
    max_staleness: int | None = None
    # per_layer only: one recompute period per target layer, in layer order.
    layer_k: list[int] | None = None

    def __post_init__(self):
        if isinstance(self.k, bool) or not isinstance(self.k, int) or self.k < 1:
            raise ValueError(f"LayerReuseConfig.k must be an integer >= 1, got {self.k!r}")
        self._check_policy()
        if self.mode not in REUSE_MODES:
            raise ValueError(f"LayerReuseConfig.mode must be one of {list(REUSE_MODES)}, got {self.mode!r}")
        if self.layers is not None:
            self.layers = validate_layers(self.layers)
            self.subset = None
        else:
            if self.subset not in SUBSETS:
                raise ValueError(
                    f"LayerReuseConfig.subset must be one of {list(SUBSETS)} (or give explicit `layers`), got {self.subset!r}"
                )
            validate_size(self.size)

    def _check_policy(self) -> None:
        if self.policy not in REUSE_POLICIES:
            raise ValueError(f"LayerReuseConfig.policy must be one of {list(REUSE_POLICIES)}, got {self.policy!r}")
        drift_fields = self.tolerance is not None or self.max_staleness is not None
        if self.policy != "per_layer" and self.layer_k is not None:
            raise ValueError(f"LayerReuseConfig.layer_k applies to policy='per_layer' only (got policy={self.policy!r})")
        if self.policy == "fixed":
            if drift_fields:
                raise ValueError("LayerReuseConfig.tolerance and max_staleness apply to policy='unmask_drift' only "
                                 "(policy='fixed' recomputes every k steps)")
            return
        if self.k != 1:
            raise ValueError(f"LayerReuseConfig.k={self.k} is the fixed policy's period; with policy={self.policy!r} "
                             "leave k=1 (" + ("bound the entry's age with max_staleness)" if self.policy == "unmask_drift"
                                              else "give one period per target layer in layer_k)"))
        if self.policy == "per_layer":
            if drift_fields:
                raise ValueError("LayerReuseConfig.tolerance and max_staleness apply to policy='unmask_drift' only "
                                 "(policy='per_layer' recomputes each layer every layer_k[j] steps)")
            if (not isinstance(self.layer_k, (list, tuple)) or not self.layer_k
                    or any(isinstance(v, bool) or not isinstance(v, int) or v < 1 for v in self.layer_k)):
                raise ValueError(f"LayerReuseConfig.layer_k={self.layer_k!r} is invalid (allowed with "
                                 "policy='per_layer': a non-empty list of integers >= 1, one per target layer)")
            self.layer_k = list(self.layer_k)
            return
        if (self.tolerance is None or isinstance(self.tolerance, bool) or not isinstance(self.tolerance, (int, float))
                or not 0.0 <= self.tolerance <= 1.0):
            raise ValueError(f"LayerReuseConfig.tolerance={self.tolerance!r} is out of range (allowed with "
                             "policy='unmask_drift': a number in [0, 1], the share of the sub-block)")
        if self.max_staleness is not None and (isinstance(self.max_staleness, bool)
                                               or not isinstance(self.max_staleness, int) or self.max_staleness < 1):
            raise ValueError(f"LayerReuseConfig.max_staleness={self.max_staleness!r} is out of range "
                             "(allowed: None or an integer >= 1)")

    def layer_count(self, num_layers: int) -> int:
        """How many layers `size` means for a model of `num_layers` layers.

        A count is itself; a share s is round(s * num_layers), halves rounded up, and at least 1
        (the default 12/28 gives 12 of 28, 6 of 14, 2 of 4, 1 of 2).
        """
        if not is_share(self.size):
            return self.size
        return max(1, math.floor(self.size * num_layers + 0.5))

    def resolve_layers(self, num_layers: int) -> tuple[int, ...]:
        """The target layer indices for a model of `num_layers` decoder layers (and, with the
        per-layer policy, a check that `layer_k` has one period for each)."""
        layers = self._resolve_layers(num_layers)
        if self.layer_k is not None and len(self.layer_k) != len(layers):
            raise ValueError(f"LayerReuseConfig.layer_k has {len(self.layer_k)} periods but the reuse targets "
                             f"{len(layers)} layers {list(layers)} (allowed: exactly one period per target layer)")
        return layers

    def _resolve_layers(self, num_layers: int) -> tuple[int, ...]:
        """first = layers 1..n (layer 0 always runs), middle = n layers centred in the stack,
        last = the final n layers, where n = `layer_count(num_layers)`."""
        if self.layers is not None:
            bad = [i for i in self.layers if i >= num_layers]
            if bad:
                raise ValueError(
                    f"LayerReuseConfig.layers {bad} out of range: the model has {num_layers} layers (0..{num_layers - 1})"
                )
            return tuple(self.layers)
        n = self.layer_count(num_layers)
        if n >= num_layers:
            share = f" ({self.size:.3g} of {num_layers} layers rounds to {n})" if is_share(self.size) else ""
            raise ValueError(
                f"LayerReuseConfig.size={self.size!r}{share} is too large for a model of {num_layers} layers "
                f"(allowed: at most {num_layers - 1} layers, or a share such as the default {DEFAULT_REUSE_SIZE:.3g})"
            )
        if self.subset == "first":
            start = 1
        elif self.subset == "middle":
            start = (num_layers - n) // 2
        else:
            start = num_layers - n
        return tuple(range(start, start + n))

    @property
    def always_computes(self) -> bool:
        """Every step computes every target layer (fixed k=1, or per_layer with every period 1):
        nothing is ever recalled, which is exactly no reuse."""
        if self.policy == "per_layer":
            return all(period == 1 for period in self.layer_k)
        return self.policy == "fixed" and self.k == 1

    @property
    def label(self) -> str:
        """A short, filesystem-safe name, e.g. `k2-first12-output` (a share: `k2-first0.429-output`)."""
        where = f"{self.subset}{size_label(self.size)}" if self.layers is None else "layers" + "_".join(map(str, self.layers))
        if self.policy == "fixed":
            return f"k{self.k}-{where}-{self.mode}"
        if self.policy == "per_layer":
            return f"ks{'.'.join(map(str, self.layer_k))}-{where}-{self.mode}"
        stale = "" if self.max_staleness is None else f"-s{self.max_staleness}"
        return f"drift{self.tolerance:g}{stale}-{where}-{self.mode}"

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def to_json_string(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "LayerReuseConfig":
        unknown = set(data) - {"k", "subset", "size", "layers", "mode", "policy", "tolerance", "max_staleness", "layer_k"}
        if unknown:
            raise ValueError(f"LayerReuseConfig got unknown fields {sorted(unknown)}")
        return cls(**data)

    @classmethod
    def coerce(cls, value) -> "LayerReuseConfig | None":
        """Accept a config, a dict (as reloaded from JSON) or None."""
        if value is None or isinstance(value, cls):
            return value
        if isinstance(value, dict):
            return cls.from_dict(value)
        raise ValueError(f"layer_reuse must be a LayerReuseConfig, a dict or None, got {type(value).__name__}")


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
        if self.layer_reuse is None or self.layer_reuse.always_computes:
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

    mask_id = get("mask_token_id")
    if mask_id is None:
        mask_id = getattr(model_config, "mask_token_id", None)
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
    if do_sample and temperature < 0:
        raise ValueError(f"temperature must be >= 0, got {temperature}")
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
