"""The benchmark's workloads: how many tokens a denoising step unmasks on random weights.

`random`: the weights as built (normal, `--init-std`). Every confidence is about 1/vocab, so exactly
one token per row clears the threshold per step (the forced most-confident one).

`target`: a trained model unmasks several tokens per step (Fast_dLLM_v2_7B reports about 2-3 per
forward on GSM8K). To time that schedule without the trained weights, the final norm's weight is
multiplied by a factor alpha. The lm_head has no bias, so the logits are multiplied by alpha: the
argmax at every position is unchanged, the softmax gets peaked, and at some positions the top token
clears the 0.9 threshold. Alpha is found by bisection (in log space) on a short batch-1 calibration
decode so that the measured `tokens_per_forward` hits the target. The decoding rule and every kernel
are the real ones; only how many tokens clear the threshold per step changes.

A row whose argmax is a stop token would end early and shorten the work (with random weights
that happens at about 1 position in vocab-size, in either workload), so the benchmark builds its
model with the lm_head rows of the stop ids zeroed (`exclude_stop_tokens`): their logit is then 0,
below the maximum of the other random logits at every position, so a stop token is never chosen.
Switching workloads changes the norm weight in place, so graphs and compiled code keep seeing the
same tensor.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from enum import Enum
from typing import Callable

import torch


# Fast_dLLM_v2_7B's mask, stop (<|im_end|>) and pad (<|endoftext|>) ids, as the benchmark builds its model.
MASK_ID, EOS_ID, PAD_ID = 151665, 151645, 151643


def prompt_vocab_high(vocab_size: int) -> int:
    """Prompt token ids are drawn below this: below the special ids, and inside a tiny model's vocabulary."""
    return min(vocab_size - 8, PAD_ID)


def benchmark_prompts(seed: int, batch: int, prompt_min: int, prompt_max: int, vocab_high: int,
                      seed_offset: int = 0) -> list[list[int]]:
    """The benchmark's random prompts for one batch size: lengths in [prompt_min, prompt_max], ids in
    [0, vocab_high). The reference sampler's timing draws the same ones. `seed_offset` gives other prompts
    of the batch size (the calibration's and the checks')."""
    gen = torch.Generator().manual_seed(seed * 1000 + batch + seed_offset)
    lengths = torch.randint(prompt_min, prompt_max + 1, (batch,), generator=gen).tolist()
    return [torch.randint(0, vocab_high, (n,), generator=gen).tolist() for n in lengths]


class Workload(str, Enum):
    RANDOM = "random"
    TARGET = "target"


# --workload values: one workload, or both (random first, then target, per batch size).
WORKLOAD_CHOICES = {"random": (Workload.RANDOM,), "target": (Workload.TARGET,), "both": (Workload.RANDOM, Workload.TARGET)}
TARGET_TOLERANCE = 0.10  # the calibrated tokens/forward must be within +-10% of the target
_CALIBRATION_STOP = 0.05  # bisection stops once within +-5% (leaves margin for the timed runs' prompts)
_ALPHA_GROWTH = 4.0  # the upper bracket grows by this factor until it reaches the target
_ALPHA_MAX = 4.0 ** 8


@dataclass
class Calibration:
    """What the bisection found: alpha, the tokens/forward it measured there, and every probe."""

    target: float
    alpha: float
    tokens_per_forward: float
    probes: list[dict] = field(default_factory=list)

    @property
    def within_tolerance(self) -> bool:
        return abs(self.tokens_per_forward - self.target) <= TARGET_TOLERANCE * self.target

    def as_dict(self) -> dict:
        return {"target_tokens_per_forward": self.target, "alpha": self.alpha,
                "tokens_per_forward": self.tokens_per_forward, "within_tolerance": self.within_tolerance,
                "tolerance": TARGET_TOLERANCE, "probes": self.probes}


def calibrate_alpha(measure: Callable[[float], float], target: float, *, max_probes: int = 14,
                    log: Callable[[str], None] = print) -> Calibration:
    """Bisect log(alpha) so that `measure(alpha)` (tokens per forward) is close to `target`.

    `measure` rises with alpha (confidences only grow as the logits are scaled), though not strictly:
    a different unmask order changes later hidden states. The best probe seen is returned."""
    probes: list[dict] = []

    def probe(alpha: float) -> float:
        tpf = measure(alpha)
        probes.append({"alpha": alpha, "tokens_per_forward": tpf})
        log(f"calibration: alpha {alpha:.4g} -> {tpf:.3f} tokens/forward (target {target})")
        return tpf

    lo, hi = 1.0, _ALPHA_GROWTH
    while probe(hi) < target:
        lo, hi = hi, hi * _ALPHA_GROWTH
        if hi > _ALPHA_MAX or len(probes) >= max_probes:
            break
    while len(probes) < max_probes:
        best = min(probes, key=lambda p: abs(p["tokens_per_forward"] - target))
        if abs(best["tokens_per_forward"] - target) <= _CALIBRATION_STOP * target:
            break
        mid = math.sqrt(lo * hi)
        if probe(mid) < target:
            lo = mid
        else:
            hi = mid
    best = min(probes, key=lambda p: abs(p["tokens_per_forward"] - target))
    return Calibration(target=target, alpha=best["alpha"], tokens_per_forward=best["tokens_per_forward"], probes=probes)


class WorkloadWeights:
    """Switches a model between the workloads in place, keeping the built norm weight to restore."""

    def __init__(self, model):
        self.norm_weight = model.model.norm.weight
        self._norm0 = self.norm_weight.detach().clone()

    @torch.no_grad()
    def set(self, workload: Workload, alpha: float = 1.0) -> None:
        """`random`: the weights as built; `target`: the final norm's weight x alpha."""
        if workload is Workload.RANDOM:
            alpha = 1.0
        self.norm_weight.copy_(self._norm0 * alpha)


def stop_token_ids(generation_config) -> list[int]:
    eos = generation_config.eos_token_id
    if eos is None:
        return []
    return sorted({int(e) for e in (eos if isinstance(eos, (list, tuple)) else [eos])})


@torch.no_grad()
def exclude_stop_tokens(model) -> list[int]:
    """Zero the lm_head rows of the model's stop ids, so no row of a benchmark decode ends early. (With tied
    embeddings this zeroes their input embedding too; the benchmark's prompts never hold a stop id.)"""
    stop_ids = stop_token_ids(model.generation_config)
    if stop_ids:
        model.lm_head.weight[stop_ids] = 0.0
    return stop_ids
