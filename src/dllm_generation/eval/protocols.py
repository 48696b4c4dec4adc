"""Named evaluation protocols: every setting that decides a published number, per task, with its source.

A protocol fixes the prompt format, shots, decoding settings, batch size, token budget and the
loglikelihood forward, so a run under it can be set beside a published reference.

- ``fork``: the layer-reuse experiment this project grew from (lm-evaluation-harness 0.4.9.x with a
  custom model class, ``v2/eval.py`` + ``v2/experiments/00_baseline/sbatch/_job.sh`` of
  mgustineli/Fast-dLLM): ``--batch_size 1 --num_fewshot 0 --apply_chat_template
  --fewshot_as_multiturn``, ``use_block_cache=True``, the model class defaults ``threshold=0.9``,
  ``max_new_tokens=2048``, ``bd_size=32``, ``small_block_size=8``.
- ``paper``: the Fast-dLLM v2 authors' ``v2/eval_script.sh`` (same harness and model class):
  GSM8K / MATH / IFEval with ``threshold=1``, batch 32, block cache off (the model class default);
  MMLU 5-shot and GPQA with batch 1 and the default threshold 0.9.
- ``custom``: starts from ``fork``'s values and lets every flag change them; its numbers compare
  with no reference.

Under ``fork`` and ``paper`` a flag that contradicts the protocol is refused (one line naming both),
except the flags in :func:`overridable`, which are recorded in the summary as overrides.

``arith`` (this project's own task, run on the shipped demo model) has no published reference: both
named protocols give it the demo model's own settings (greedy, threshold 0.9, block cache on, chat
template, 0-shot, 320 new tokens, the checkpoint's dtype), and its batch size is free.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass


class Protocol(str, enum.Enum):
    FORK = "fork"
    PAPER = "paper"
    CUSTOM = "custom"


PROTOCOLS = tuple(p.value for p in Protocol)
DEFAULT_PROTOCOL = Protocol.FORK.value


class LoglikelihoodForward(str, enum.Enum):
    """How one masked forward scores a continuation (see `dllm_generation.scoring`)."""

    # Fast-dLLM v2 eval.py: only the first continuation token is masked (and scored); the rest of the
    # continuation, EOS and mask padding to the block end stay visible to it inside its block.
    REFERENCE = "reference"
    # Every continuation token masked and scored; slots after the sequence hidden. A proper
    # sum over the continuation (multi-token answers differ from the reference here).
    MASKED_CONTINUATION = "masked_continuation"


LOGLIKELIHOOD_FORWARDS = tuple(v.value for v in LoglikelihoodForward)

# Tasks decoded by block diffusion vs scored by loglikelihood (the lm-eval output types).
GENERATIVE_TASKS = ("gsm8k", "math", "minerva_math", "ifeval")
# This project's own task (the shipped demo model): no reference ran it; protocols give it the demo
# model's own settings.
OWN_TASKS = ("arith",)
# Generation budgets that differ from 2048: arith solutions are under 200 tokens.
TASK_MAX_NEW_TOKENS = {"arith": 320}
LOGLIKELIHOOD_TASKS = ("mmlu", "gpqa")

# The lm-eval task each pipeline task renders like (tests compare against these task files).
LM_EVAL_TASK = {
    "gsm8k": "gsm8k",
    "math": "minerva_math500",
    "minerva_math": "minerva_math",
    "ifeval": "ifeval",
    "mmlu": "mmlu",
    "gpqa": "gpqa_main_n_shot",
    "arith": "arith",  # not an lm-eval task
}

# Flags a fork/paper run may change: they are recorded as overrides, and the numbers stay comparable
# (layer reuse is the variable under study; the others change where or how fast, not what is decoded,
# except max_new_tokens, which is there for short smoke runs and is recorded).
OVERRIDABLE = ("max_new_tokens", "dtype", "fast_path")
# Own tasks have no reference whose batching a run must follow: their batch size is free too
# (this library decodes every row independently of its batch).
OWN_TASK_OVERRIDABLE = OVERRIDABLE + ("batch_size",)

# Settings a protocol decides (EvalOptions field names).
GOVERNED = ("block_size", "small_block_size", "threshold", "use_block_cache", "max_new_tokens", "batch_size",
            "chat_template", "num_fewshot", "mmlu_mode", "loglikelihood_forward", "dtype")


@dataclass(frozen=True)
class Settings:
    """One task's settings under one protocol, and where each comes from."""

    threshold: float
    use_block_cache: bool
    batch_size: int
    num_fewshot: int
    max_new_tokens: int = 2048
    block_size: int = 32
    small_block_size: int = 8
    chat_template: bool = True
    mmlu_mode: str = "loglikelihood"
    loglikelihood_forward: str = LoglikelihoodForward.REFERENCE.value
    # "reference": bf16 on compute capability >= 8.0, fp16 on 7.x, fp32 without CUDA (eval.py's rule).
    dtype: str = "reference"
    source: str = ""

    def as_dict(self) -> dict:
        return {name: getattr(self, name) for name in GOVERNED}


_FORK_SOURCE = ("mgustineli/Fast-dLLM v2/experiments/00_baseline/sbatch/_job.sh (batch 1, 0-shot, chat template, "
                "multiturn, use_block_cache=True) + v2/eval.py defaults (threshold 0.9, 2048 tokens, 32/8)")
_PAPER_GEN = "NVlabs Fast-dLLM v2/eval_script.sh: batch 32, 0-shot, threshold=1, use_block_cache default False"
_PAPER_LL = "NVlabs Fast-dLLM v2/eval_script.sh: batch 1, chat template, multiturn; eval.py default threshold 0.9"

_FORK = Settings(threshold=0.9, use_block_cache=True, batch_size=1, num_fewshot=0, source=_FORK_SOURCE)
_OWN = Settings(threshold=0.9, use_block_cache=True, batch_size=8, num_fewshot=0,
                max_new_tokens=TASK_MAX_NEW_TOKENS["arith"], dtype="auto",
                source="this project's arith task (no published reference): the demo model's own settings: greedy, "
                "threshold 0.9, block cache on, chat template, 0-shot, 320 new tokens, the checkpoint's dtype; "
                "batch size free (default 8)")

TABLE: dict[str, dict[str, Settings]] = {
    Protocol.FORK.value: {**{task: _FORK for task in GENERATIVE_TASKS + LOGLIKELIHOOD_TASKS}, "arith": _OWN},
    Protocol.PAPER.value: {
        **{task: Settings(threshold=1.0, use_block_cache=False, batch_size=32, num_fewshot=0, source=_PAPER_GEN)
           for task in GENERATIVE_TASKS},
        "mmlu": Settings(threshold=0.9, use_block_cache=False, batch_size=1, num_fewshot=5,
                         source=_PAPER_LL + " (--num_fewshot 5)"),
        "gpqa": Settings(threshold=0.9, use_block_cache=False, batch_size=1, num_fewshot=0,
                         source=_PAPER_LL + " (task default: 0-shot)"),
        "arith": _OWN,
    },
}
TABLE[Protocol.CUSTOM.value] = TABLE[Protocol.FORK.value]

# What replaces what in the chat-rendered prompt (eval.py's generate_until, applied to the whole text).
# The replacement is a plain string, not an f-string, so it keeps two braces: "\boxed{{}}".
REFERENCE_REWRITES = {
    "gsm8k": ("Answer:", "Please reason step by step, and put your final answer within \\boxed{{}}."),
    "minerva_math": ("Solution:", "Please reason step by step, and put your final answer within \\boxed{{}}."),
}


def settings_for(protocol: str, task: str) -> Settings:
    return TABLE[protocol][task]


def overridable(task: str) -> tuple[str, ...]:
    """Governed settings a fork/paper run of `task` may change (recorded as overrides)."""
    return OWN_TASK_OVERRIDABLE if task in OWN_TASKS else OVERRIDABLE


def reference_rewrite(lm_eval_task_name: str, prompt: str) -> str:
    """eval.py's prompt edit: by lm-eval task-name prefix, every occurrence replaced."""
    for prefix, (old, new) in REFERENCE_REWRITES.items():
        if lm_eval_task_name.startswith(prefix):
            return prompt.replace(old, new)
    return prompt


def reference_dtype(device: str | None) -> str:
    """eval.py's dtype rule: bf16 on compute capability >= 8.0, fp16 on 7.x, fp32 otherwise."""
    import torch

    if device is not None and not str(device).startswith("cuda"):
        return "float32"
    if not torch.cuda.is_available():
        return "float32"
    index = torch.device(device or "cuda").index
    major, minor = torch.cuda.get_device_capability(index if index is not None else torch.cuda.current_device())
    if major * 10 + minor >= 80:
        return "bfloat16"
    return "float16" if major >= 7 else "float32"


def reference_budget(prompt_length: int, max_new_tokens: int, block_size: int) -> int:
    """New tokens the reference decoder can emit: blocks up to `max_new_tokens // bs + L // bs` (absolute),
    plus the one token the last block's commit forward predicts."""
    return (max_new_tokens // block_size + prompt_length // block_size) * block_size + 1 - prompt_length
