"""`LayerReuseConfig`, its shared validators, the ONE label of a reuse config and the ONE rule for no reuse.

Policy-specific fields are checked by their policy (`policies/`); everything here holds for every
policy. `GenerationConfig` keeps unknown fields as attributes and serialises dataclasses through
their `to_dict`; a reloaded config therefore holds `layer_reuse` as a plain dict, which
`LayerReuseConfig.coerce` rehydrates.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, fields
from typing import Any

from .policies import get_policy, policy_names, registered_policies

SUBSETS = ("first", "middle", "last")
REUSE_MODES = ("output", "residual")
# How a reuse step is decided: one registered policy per file of reuse/policies/.
REUSE_POLICIES = policy_names()
# Default reuse size: a share of the model's layers, so one setting fits every depth. 12 of 28
# layers is the published layer-reuse experiment on Fast_dLLM_v2_7B; the same share is 6 of 14.
DEFAULT_REUSE_SIZE = 12 / 28

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


def size_label(size) -> str:
    """How a size appears in names: the count, or the share with 3 significant digits (0.429)."""
    return f"{size:.3g}" if is_share(size) else str(size)


def reuse_label(reuse, sep: str = "-") -> str:
    """The name of a reuse setting: schedule, layers, mode (`k2-first0.429-output`, `ks2.3-layers1_2-output`).

    `reuse` is anything with LayerReuseConfig's field names (the config itself, or the eval's
    options); `sep` joins the parts (`-` in labels, `_` in eval folder names), and a layer list is
    joined with the other one, so names stay filesystem-safe and split back into their parts.
    """
    inner = "-" if sep == "_" else "_"
    layers = getattr(reuse, "layers", None)
    where = "layers" + inner.join(map(str, layers)) if layers else f"{reuse.subset}{size_label(reuse.size)}"
    return sep.join([*get_policy(reuse.policy).label_parts(reuse), where, reuse.mode])


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
    Other registered policies (reuse/policies/) are selected the same way, by name.
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
        """The policy exists, no other policy's fields are set, k stays 1 unless the policy reads it,
        and the policy's own fields are valid."""
        policy = get_policy(self.policy)
        if policy is None:
            raise ValueError(f"LayerReuseConfig.policy must be one of {list(policy_names())}, got {self.policy!r}")
        for other in registered_policies():
            if other is not policy and any(getattr(self, name) is not None for name in other.fields):
                raise ValueError(other.refuse_fields(self))
        if not policy.uses_k and self.k != 1:
            raise ValueError(f"LayerReuseConfig.k={self.k} is the fixed policy's period; with policy={self.policy!r} "
                             f"leave k=1 ({policy.instead_of_k})")
        policy.check(self)

    def layer_count(self, num_layers: int) -> int:
        """How many layers `size` means for a model of `num_layers` layers.

        A count is itself; a share s is round(s * num_layers), halves rounded up, and at least 1
        (the default 12/28 gives 12 of 28, 6 of 14, 2 of 4, 1 of 2).
        """
        if not is_share(self.size):
            return self.size
        return max(1, math.floor(self.size * num_layers + 0.5))

    def resolve_layers(self, num_layers: int) -> tuple[int, ...]:
        """The target layer indices for a model of `num_layers` decoder layers (and the policy's
        check that it fits them, e.g. one per_layer period for each)."""
        layers = self._resolve_layers(num_layers)
        get_policy(self.policy).check_targets(self, layers)
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
            if len(set(self.layers)) >= num_layers:  # as for size: reusing every layer would compute nothing new
                raise ValueError(
                    f"LayerReuseConfig.layers lists all {num_layers} layers of the model (allowed: at most "
                    f"{num_layers - 1}; at least one layer must keep running)"
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
        """Every step computes every target layer (fixed k=1, per_layer with every period 1, ...):
        nothing is ever recalled, which is exactly no reuse. The policy says when; see `no_reuse`."""
        return get_policy(self.policy).never_recalls(self)

    @property
    def label(self) -> str:
        """A short, filesystem-safe name, e.g. `k2-first12-output` (a share: `k2-first0.429-output`)."""
        return reuse_label(self)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def to_json_string(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "LayerReuseConfig":
        unknown = set(data) - set(REUSE_FIELDS)
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


# The config's fields, in order: what other code copies into or out of a config (eval options, run records).
REUSE_FIELDS = tuple(f.name for f in fields(LayerReuseConfig))


def no_reuse(config: LayerReuseConfig | None) -> bool:
    """The one rule for "this decodes exactly as plain decoding": no config, or one that never recalls."""
    return config is None or config.always_computes
