"""The fine-tuning mixture: GSM8K train solutions and `arith` train problems, as the eval prompts them.

Each row's prompt is rendered by the eval pipeline's own code (`eval.prompts`: the chat template and,
for GSM8K, the boxed-answer instruction), so training and evaluation read the same text by
construction. GSM8K solutions lose their `<<48/2=24>>` calculator annotations and end with
`The answer is \\boxed{N}.`, the form the GSM8K prompt asks for; `arith` solutions end with `#### N`.
The row order is a pure function of (seed, index), so a resumed run sees the same data.
"""

from __future__ import annotations

import json
import random
import re

import torch

from ..arith.problems import Difficulty, Split, problem_at
from ..eval.prompts import build_prompt, render_prompt

CALCULATOR_ANNOTATION = re.compile(r"<<[^>]*>>")
GSM8K_HUB_DATASET = ("openai/gsm8k", "main")


def gsm8k_solution(answer_field: str) -> str:
    """A GSM8K `answer` field as a chat answer: the reasoning, then the boxed final number."""
    reasoning, sep, final = answer_field.rpartition("####")
    if not sep:
        raise ValueError(f"GSM8K answer has no '#### N' line: {answer_field[-80:]!r}")
    reasoning = CALCULATOR_ANNOTATION.sub("", reasoning).strip()
    return f"{reasoning}\nThe answer is \\boxed{{{final.strip().replace(',', '')}}}."


def read_gsm8k_train(path: str | None) -> list[dict]:
    """GSM8K train rows (`question`, `answer`) from a local JSON Lines file, else from the hub."""
    if path is None:
        from datasets import load_dataset

        return [dict(r) for r in load_dataset(*GSM8K_HUB_DATASET, split="train")]
    with open(path, encoding="utf-8") as f:
        rows = [json.loads(line) for line in f if line.strip()]
    for index, row in enumerate(rows):
        if not isinstance(row.get("question"), str) or not isinstance(row.get("answer"), str):
            raise ValueError(f"{path}: row {index} needs string fields 'question' and 'answer'")
    return rows


def chat_example(tokenizer, task: str, doc: dict, answer: str) -> dict:
    """`{"input_ids", "prompt_length"}`: the eval's prompt for `doc`, then `answer` and the stop token."""
    prompt_ids = render_prompt(tokenizer, build_prompt(task, doc, {}), chat_template=True)
    answer_ids = tokenizer(answer + tokenizer.eos_token, add_special_tokens=False)["input_ids"]
    return {"input_ids": prompt_ids + answer_ids, "prompt_length": len(prompt_ids)}


class TrainingMixture(torch.utils.data.Dataset):
    """`size` rows: a `gsm8k_share` of GSM8K train (cycled in a seeded order), the rest `arith` train.

    GSM8K rows longer than `max_tokens` are left out (counted in `dropped`).
    """

    def __init__(self, tokenizer, size: int, gsm8k_rows: list[dict], *, seed: int = 0,
                 gsm8k_share: float = 0.3, difficulty: Difficulty | None = None, max_tokens: int = 512):
        if not 0.0 <= gsm8k_share <= 1.0:
            raise ValueError(f"gsm8k_share={gsm8k_share} is outside [0, 1]")
        if gsm8k_share > 0 and not gsm8k_rows:
            raise ValueError("gsm8k_share > 0 but there are no GSM8K rows")
        self.tokenizer, self.size, self.seed, self.share = tokenizer, size, seed, gsm8k_share
        self.difficulty = (difficulty or Difficulty()).validate()
        examples = [chat_example(tokenizer, "gsm8k", row, gsm8k_solution(row["answer"])) for row in gsm8k_rows]
        self.gsm8k = [e for e in examples if len(e["input_ids"]) <= max_tokens]
        self.dropped = len(examples) - len(self.gsm8k)
        random.Random(seed).shuffle(self.gsm8k)

    def __len__(self) -> int:
        return self.size

    def source(self, index: int) -> str:
        return "gsm8k" if random.Random(f"{self.seed}:{index}").random() < self.share else "arith"

    def __getitem__(self, index: int) -> dict:
        if self.source(index) == "gsm8k":
            return self.gsm8k[index % len(self.gsm8k)]
        problem = problem_at(Split.TRAIN, index, seed=self.seed, difficulty=self.difficulty)
        return chat_example(self.tokenizer, "arith", {"question": problem.question}, problem.answer)


class AnswerOnlyCausalCollator:
    """Right-padded batches for plain next-token training, with the loss on the answer and stop token only."""

    def __init__(self, pad_token_id: int):
        self.pad_token_id = pad_token_id

    def __call__(self, examples: list[dict]) -> dict[str, torch.Tensor]:
        longest = max(len(e["input_ids"]) for e in examples)
        ids = torch.full((len(examples), longest), self.pad_token_id, dtype=torch.long)
        attention = torch.zeros_like(ids)
        labels = torch.full_like(ids, -100)
        for row, example in enumerate(examples):
            tokens = torch.as_tensor(example["input_ids"], dtype=torch.long)
            ids[row, : len(tokens)] = tokens
            attention[row, : len(tokens)] = 1
            labels[row, example["prompt_length"]: len(tokens)] = tokens[example["prompt_length"]:]
        return {"input_ids": ids, "attention_mask": attention, "labels": labels}
