"""Everything one evaluation run needs to know, checked before any model or data is touched.

The same `EvalOptions` drives a single-task script, every cell of a grid and the artifact
folder name, so a run is fully described (and resumable) by this object alone.
"""

from __future__ import annotations

import dataclasses
import os
import tempfile
from dataclasses import dataclass

from ..config import (
    DEFAULT_REUSE_SIZE,
    DIFFUSION_DEFAULTS,
    REUSE_MODES,
    SUBSETS,
    size_label,
    validate_block_sizes,
    validate_layers,
    validate_size,
    validate_threshold,
)

TASKS = ("gsm8k", "math", "ifeval", "mmlu", "gpqa", "arith")
MMLU_MODES = ("loglikelihood", "generative")
# GPU fast path of generate(): on = where it applies (CUDA graphs), off = plain path, compile = graphs + torch.compile.
FAST_PATHS = ("on", "off", "graphs", "compile")
FAST_PATH_VALUES = {"on": None, "off": False, "graphs": "graphs", "compile": "compile"}
DTYPES = ("auto", "bfloat16", "float16", "float32")

DEFAULT_MODEL = "Efficient-Large-Model/Fast_dLLM_v2_7B"
# Tasks whose default model is not the 7B checkpoint: `arith` runs on the shipped demo model.
TASK_DEFAULT_MODEL = {"arith": "demo"}
DEFAULT_MAX_NEW_TOKENS = 2048
# Generation budgets that differ from the default: arith solutions are under 200 tokens.
TASK_MAX_NEW_TOKENS = {"arith": 320}
# Published Fast-dLLM v2 evaluation: few-shot counts per task (MMLU 5-shot from dev, the rest 0-shot).
DEFAULT_NUM_FEWSHOT = {"gsm8k": 0, "math": 0, "ifeval": 0, "mmlu": 5, "gpqa": 0, "arith": 0}
# Tasks whose prompts know how to show worked examples.
FEWSHOT_TASKS = ("gsm8k", "mmlu")


class InvalidOptionError(ValueError):
    """A user-supplied option is out of range; the message names the field and what is allowed."""


@dataclass
class EvalOptions:
    """One evaluation run: task, model, layer reuse, decoding, data source and output place."""

    task: str
    model: str | None = None  # None = the task's default (TASK_DEFAULT_MODEL, else DEFAULT_MODEL)
    tokenizer: str | None = None
    dtype: str = "auto"
    device: str | None = None
    mask_token_id: int | None = None
    # layer reuse (the library's LayerReuseConfig defaults; size: a count, or a share of the layers)
    k: int = 1
    subset: str = SUBSETS[0]
    size: int | float = DEFAULT_REUSE_SIZE
    layers: list[int] | None = None
    mode: str = REUSE_MODES[0]
    # decoding (the library's GenerationConfig defaults = Fast-dLLM v2's)
    block_size: int = DIFFUSION_DEFAULTS["block_size"]
    small_block_size: int = DIFFUSION_DEFAULTS["small_block_size"]
    threshold: float = DIFFUSION_DEFAULTS["threshold"]
    use_block_cache: bool = DIFFUSION_DEFAULTS["use_block_cache"]
    fast_path: str = "on"
    max_new_tokens: int | None = None  # None = the task's budget (TASK_MAX_NEW_TOKENS, else 2048)
    batch_size: int = 8
    # prompts and data
    chat_template: bool = True
    num_fewshot: int | None = None
    mmlu_mode: str = "loglikelihood"
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
        if self.max_new_tokens is None:
            self.max_new_tokens = TASK_MAX_NEW_TOKENS.get(self.task, DEFAULT_MAX_NEW_TOKENS)

    # ------------------------------------------------------------------ checks
    def validate(self) -> "EvalOptions":
        """Raise InvalidOptionError naming the first bad field and its allowed values."""
        _choice("task", self.task, TASKS)
        _choice("subset", self.subset, SUBSETS)
        _choice("mode", self.mode, REUSE_MODES)
        _choice("mmlu_mode", self.mmlu_mode, MMLU_MODES)
        _choice("dtype", self.dtype, DTYPES)
        _choice("fast_path", self.fast_path, FAST_PATHS)
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
        except ValueError as err:
            raise InvalidOptionError(str(err)) from None
        _writable_folder("output_dir", self.output_dir)
        if self.num_fewshot is not None:
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
        return self

    # ------------------------------------------------------------------ derived
    @property
    def fewshot(self) -> int:
        """Number of worked examples in each prompt (the task default unless set)."""
        return DEFAULT_NUM_FEWSHOT[self.task] if self.num_fewshot is None else self.num_fewshot

    @property
    def uses_loglikelihood(self) -> bool:
        return self.task == "mmlu" and self.mmlu_mode == "loglikelihood"

    def config_name(self) -> str:
        """Folder name of this configuration: reuse settings plus every non-default decoding knob."""
        if self.run_name:
            return self.run_name
        where = "layers" + "-".join(str(i) for i in self.layers) if self.layers else f"{self.subset}{size_label(self.size)}"
        parts = [f"k{self.k}", where, self.mode]
        defaults = EvalOptions(task=self.task)
        if (self.block_size, self.small_block_size) != (defaults.block_size, defaults.small_block_size):
            parts.append(f"b{self.block_size}s{self.small_block_size}")
        if self.threshold != defaults.threshold:
            parts.append(f"t{self.threshold:g}")
        if not self.use_block_cache:
            parts.append("nocache")
        if self.fast_path != defaults.fast_path:  # bf16 rounding differs between paths
            parts.append(f"fast{self.fast_path}")
        if self.max_new_tokens != defaults.max_new_tokens:
            parts.append(f"n{self.max_new_tokens}")
        if not self.chat_template:
            parts.append("nochat")
        if self.num_fewshot is not None and self.num_fewshot != DEFAULT_NUM_FEWSHOT[self.task]:
            parts.append(f"{self.num_fewshot}shot")
        if self.task == "mmlu" and self.mmlu_mode == "generative":
            parts.append("gen")
        if self.dtype != defaults.dtype:
            parts.append(self.dtype)
        if self.seed != defaults.seed:
            parts.append(f"seed{self.seed}")
        return "_".join(parts)

    def identity(self) -> dict:
        """What decides the outputs of a run: finished samples may only be reused under the same identity.

        Row count (`limit`), batch size, device and bookkeeping flags are left out: a larger
        --limit extends a run, and greedy decoding does not depend on them.
        """
        keep = ("task", "model", "tokenizer", "dtype", "mask_token_id", "k", "subset", "size", "layers", "mode",
                "block_size", "small_block_size", "threshold", "use_block_cache", "fast_path", "max_new_tokens",
                "chat_template", "mmlu_mode", "seed", "data_files", "fewshot_files", "dataset",
                "dataset_config", "split")
        out = {name: getattr(self, name) for name in keep}
        out["num_fewshot"] = self.fewshot
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
