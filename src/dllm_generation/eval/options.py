"""Everything one evaluation run needs to know, checked before any model or data is touched.

The same `EvalOptions` drives a single-task script, every cell of a grid and the artifact
folder name, so a run is fully described (and resumable) by this object alone.
"""

from __future__ import annotations

import dataclasses
import os
import re
import tempfile
from dataclasses import dataclass

from ..config import validate_block_sizes, validate_threshold
from ..reuse.config import (
    DEFAULT_REUSE_SIZE,
    REUSE_FIELDS,
    REUSE_MODES,
    REUSE_POLICIES,
    SUBSETS,
    LayerReuseConfig,
    reuse_label,
    validate_layers,
    validate_size,
)
from ..reuse.policies import registered_policies
from .protocols import (
    DEFAULT_PROTOCOL,
    GOVERNED,
    LOGLIKELIHOOD_FORWARDS,
    LOGLIKELIHOOD_TASKS,
    PROTOCOLS,
    Protocol,
    overridable,
    settings_for,
)

TASKS = ("gsm8k", "math", "minerva_math", "ifeval", "mmlu", "gpqa", "arith")
MMLU_MODES = ("loglikelihood", "generative")
# Engine of generate(): on = the graphed engine (CUDA graphs) where it applies, off = the eager engine,
# graphs / compile = the graphed engine explicitly (CUDA only), compile adding torch.compile.
FAST_PATHS = ("on", "off", "graphs", "compile")
FAST_PATH_VALUES = {"on": None, "off": False, "graphs": "graphs", "compile": "compile"}
# reference = the reference's rule (bf16 on compute capability >= 8.0, fp16 on 7.x, fp32 off CUDA).
DTYPES = ("reference", "auto", "bfloat16", "float16", "float32")

DEFAULT_MODEL = "Efficient-Large-Model/Fast_dLLM_v2_7B"
# Tasks whose default model is not the 7B checkpoint: `arith` runs on the shipped demo model.
TASK_DEFAULT_MODEL = {"arith": "demo"}
# Tasks whose prompts know how to show worked examples (lm-eval's first_n dev rows per subject).
FEWSHOT_TASKS = ("mmlu",)


class InvalidOptionError(ValueError):
    """A user-supplied option is out of range; the message names the field and what is allowed."""


@dataclass
class EvalOptions:
    """One evaluation run: task, model, layer reuse, decoding, data source and output place."""

    task: str
    protocol: str = DEFAULT_PROTOCOL
    model: str | None = None  # None = the task's default (TASK_DEFAULT_MODEL, else DEFAULT_MODEL)
    tokenizer: str | None = None
    dtype: str | None = None
    device: str | None = None
    mask_token_id: int | None = None
    # layer reuse (the library's LayerReuseConfig defaults; size: a count, or a share of the layers)
    k: int = 1
    subset: str = SUBSETS[0]
    size: int | float = DEFAULT_REUSE_SIZE
    layers: list[int] | None = None
    mode: str = REUSE_MODES[0]
    # reuse policy (LayerReuseConfig.policy): fixed = every k steps; unmask_drift = by unmasked share;
    # per_layer = one period per target layer (layer_k)
    policy: str = REUSE_POLICIES[0]
    tolerance: float | None = None
    max_staleness: int | None = None
    layer_k: list[int] | None = None
    # decoding; None = the protocol's value (see protocols.py)
    block_size: int | None = None
    small_block_size: int | None = None
    threshold: float | None = None
    use_block_cache: bool | None = None
    fast_path: str = "on"
    max_new_tokens: int | None = None
    batch_size: int | None = None
    loglikelihood_forward: str | None = None
    # prompts and data
    chat_template: bool | None = None
    num_fewshot: int | None = None
    mmlu_mode: str | None = None
    limit: int | None = None
    seed: int = 0
    data_files: list[str] | None = None
    fewshot_files: list[str] | None = None
    dataset: str | None = None
    dataset_config: str | None = None
    split: str | None = None
    # run bookkeeping
    output_dir: str = "artifacts"
    run_name: str | None = None
    warmup: bool = True
    force: bool = False

    def __post_init__(self):
        if self.model is None:
            self.model = TASK_DEFAULT_MODEL.get(self.task, DEFAULT_MODEL)

    # ------------------------------------------------------------------ checks
    def validate(self) -> "EvalOptions":
        """The options with the protocol's settings filled in; raise InvalidOptionError naming the first
        bad field and its allowed values, or the flag that contradicts the protocol."""
        _choice("protocol", self.protocol, PROTOCOLS)
        _choice("task", self.task, TASKS)
        self._check_protocol()
        out = self.resolved()
        out._validate_values()
        return out

    def resolved(self) -> "EvalOptions":
        """A copy with every protocol-governed field that is None set to the protocol's value."""
        if self.protocol not in PROTOCOLS or self.task not in TASKS:
            return self
        wanted = settings_for(self.protocol, self.task).as_dict()
        fill = {name: value for name, value in wanted.items() if getattr(self, name) is None}
        return dataclasses.replace(self, **fill) if fill else self

    def overrides(self) -> dict:
        """Governed settings this run sets differently from its protocol (only `overridable` ones, or any under custom)."""
        wanted = settings_for(self.protocol, self.task).as_dict()
        return {name: getattr(self, name) for name in GOVERNED
                if getattr(self, name) is not None and getattr(self, name) != wanted[name]}

    def _check_protocol(self) -> None:
        if self.protocol == Protocol.CUSTOM.value:
            return
        allowed = overridable(self.task)
        for name, value in self.overrides().items():
            if name in allowed:
                continue
            wanted = settings_for(self.protocol, self.task).as_dict()[name]
            flag = "--" + name.replace("_", "-")
            raise InvalidOptionError(
                f"{flag}={value!r} contradicts --protocol {self.protocol} ({name}={wanted!r} for {self.task}); "
                f"drop {flag}, or use --protocol custom (allowed overrides: {', '.join(allowed)})"
            )

    def _validate_values(self) -> None:
        _choice("subset", self.subset, SUBSETS)
        _choice("mode", self.mode, REUSE_MODES)
        _choice("mmlu_mode", self.mmlu_mode, MMLU_MODES)
        _choice("dtype", self.dtype, DTYPES)
        _choice("fast_path", self.fast_path, FAST_PATHS)
        _choice("loglikelihood_forward", self.loglikelihood_forward, LOGLIKELIHOOD_FORWARDS)
        _at_least("k", self.k, 1)
        _at_least("max_new_tokens", self.max_new_tokens, 1)
        _at_least("batch_size", self.batch_size, 1)
        _at_least("seed", self.seed, 0)
        if self.limit is not None:
            _at_least("limit", self.limit, 1)
        try:  # the library's own rules, so the CLI and GenerationConfig accept the same values
            validate_size(self.size, "size")
            validate_block_sizes(self.block_size, self.small_block_size)
            validate_threshold(self.threshold)
            if self.layers is not None:
                validate_layers(self.layers, "layers")
            if self.uses_policy_fields:
                self.layer_reuse()
        except ValueError as err:
            raise InvalidOptionError(str(err)) from None
        if self.run_name is not None:
            _run_name(self.run_name)
        _writable_folder("output_dir", self.output_dir)
        _at_least("num_fewshot", self.num_fewshot, 0)
        if self.num_fewshot > 0 and self.task not in FEWSHOT_TASKS:
            raise InvalidOptionError(
                f"num_fewshot={self.num_fewshot} is not supported for task {self.task!r} "
                f"(allowed: 0; few-shot prompts exist for {', '.join(FEWSHOT_TASKS)})"
            )
        if self.mmlu_mode != "loglikelihood" and self.task != "mmlu":
            raise InvalidOptionError(f"mmlu_mode={self.mmlu_mode!r} only applies to task 'mmlu'")
        for name in ("data_files", "fewshot_files"):
            for path in getattr(self, name) or []:
                if not os.path.exists(path):
                    raise InvalidOptionError(f"{name}: {path!r} does not exist (allowed: existing files or folders)")

    # ------------------------------------------------------------------ derived
    @property
    def uses_policy_fields(self) -> bool:
        """Any reuse-policy setting beyond the fixed schedule's defaults (another policy, or a field
        that only some policy reads)."""
        return self.policy != REUSE_POLICIES[0] or any(
            getattr(self, name, None) is not None for policy in registered_policies() for name in policy.fields)

    def layer_reuse(self) -> LayerReuseConfig:
        """These options' reuse settings as the library's config (ValueError if they are invalid)."""
        return LayerReuseConfig(**{name: getattr(self, name) for name in REUSE_FIELDS})

    @property
    def fewshot(self) -> int:
        """Number of worked examples in each prompt (the protocol's unless set)."""
        return self.resolved().num_fewshot

    @property
    def uses_loglikelihood(self) -> bool:
        if self.task in LOGLIKELIHOOD_TASKS:
            return not (self.task == "mmlu" and self.resolved().mmlu_mode == "generative")
        return False

    def config_name(self) -> str:
        """Folder name of this configuration: reuse settings plus every setting that differs from the protocol."""
        if self.run_name:
            return self.run_name
        me = self.resolved()
        parts = [reuse_label(self, sep="_")]
        if self.protocol != DEFAULT_PROTOCOL:
            parts.append(self.protocol)
        defaults = EvalOptions(task=self.task, protocol=self.protocol).resolved()
        if (me.block_size, me.small_block_size) != (defaults.block_size, defaults.small_block_size):
            parts.append(f"b{me.block_size}s{me.small_block_size}")
        if me.threshold != defaults.threshold:
            parts.append(f"t{me.threshold:g}")
        if me.use_block_cache != defaults.use_block_cache:
            parts.append("cache" if me.use_block_cache else "nocache")
        if me.fast_path != defaults.fast_path:  # bf16 rounding differs between paths
            parts.append(f"fast{me.fast_path}")
        if me.max_new_tokens != defaults.max_new_tokens:
            parts.append(f"n{me.max_new_tokens}")
        if me.chat_template != defaults.chat_template:
            parts.append("chat" if me.chat_template else "nochat")
        if me.num_fewshot != defaults.num_fewshot:
            parts.append(f"{me.num_fewshot}shot")
        if me.mmlu_mode != defaults.mmlu_mode:
            parts.append("gen")
        if me.loglikelihood_forward != defaults.loglikelihood_forward:
            parts.append(me.loglikelihood_forward)
        if me.dtype != defaults.dtype:
            parts.append(me.dtype)
        if self.seed != defaults.seed:
            parts.append(f"seed{self.seed}")
        return "_".join(parts)

    def identity(self) -> dict:
        """What decides the outputs of a run: finished samples may only be reused under the same identity.

        Row count (`limit`), batch size, device and bookkeeping flags are left out: a larger
        --limit extends a run, and greedy decoding does not depend on them.
        """
        keep = ("task", "protocol", "model", "tokenizer", "dtype", "mask_token_id", "k", "subset", "size", "layers",
                "mode", "block_size", "small_block_size", "threshold", "use_block_cache", "fast_path", "max_new_tokens", "chat_template", "mmlu_mode", "loglikelihood_forward", "seed", "data_files",
                "fewshot_files", "dataset", "dataset_config", "split")
        me = self.resolved()
        out = {name: getattr(me, name) for name in keep}
        out["num_fewshot"] = me.num_fewshot
        # Reuse-policy settings only where they differ from the fixed schedule, so runs made before
        # these settings existed keep their identity and resume.
        if me.uses_policy_fields:
            out.update(policy=me.policy, tolerance=me.tolerance, max_staleness=me.max_staleness)
            if me.layer_k is not None:
                out["layer_k"] = list(me.layer_k)
        for name in ("model", "tokenizer"):
            if out[name] and os.path.exists(out[name]):
                out[name] = os.path.abspath(out[name])
        for name in ("data_files", "fewshot_files"):
            if out[name]:
                out[name] = [os.path.abspath(p) for p in out[name]]
        return out

    def run_dir(self) -> str:
        return os.path.join(self.output_dir, self.task, self.config_name())

    def replace(self, **changes) -> "EvalOptions":
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def _choice(name: str, value, allowed) -> None:
    if value not in allowed:
        raise InvalidOptionError(f"{name}={value!r} is not allowed (allowed: {', '.join(map(str, allowed))})")


# A run name is one folder inside <output_dir>/<task>/: anything else (a path, "..", a hidden name)
# would write where `report` never looks, or outside the output folder.
RUN_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9._-]{0,127}")


def _run_name(value) -> None:
    if not isinstance(value, str) or not RUN_NAME.fullmatch(value):
        raise InvalidOptionError(
            f"run_name={value!r} is not allowed (allowed: one folder name of letters, digits, '.', '_' and '-', "
            "not starting with '.', at most 128 characters)"
        )


def _writable_folder(name: str, path: str) -> None:
    """The folder exists and is writable, or can be created: checked by writing, not by mode bits
    (which a privileged user or a read-only mount would make misleading). Leaves nothing behind."""
    target = os.path.abspath(path)
    existing = target
    while not os.path.exists(existing):
        existing = os.path.dirname(existing)
    if not os.path.isdir(existing):
        raise InvalidOptionError(
            f"{name}={path!r} cannot be created: {existing!r} is a file (allowed: a writable folder, or a path where one can be created)"
        )
    try:
        with tempfile.TemporaryFile(dir=existing):
            pass
    except OSError as err:
        raise InvalidOptionError(
            f"{name}={path!r} is not writable: {existing!r}: {err.strerror or err} (allowed: a writable folder)"
        ) from None


def _at_least(name: str, value, low: int) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < low:
        raise InvalidOptionError(f"{name}={value!r} is out of range (allowed: an integer >= {low})")
