"""`arith` as training data and as the shipped held-out test set."""

from __future__ import annotations

import json
from importlib import resources

import torch

from ..training.examples import tokenize_chat_example
from .problems import Difficulty, Problem, Split, generate, problem_at

TEST_SET_SIZE = 1000
TEST_SET_SEED = 0


def test_set_path() -> str:
    """The shipped held-out test set (JSON Lines: id, question, answer, final, steps, skeleton)."""
    return str(resources.files("dllm_generation.arith").joinpath("test.jsonl"))


def build_test_set(count: int = TEST_SET_SIZE, *, seed: int = TEST_SET_SEED,
                   difficulty: Difficulty | None = None) -> list[Problem]:
    """The first `count` test-split problems with distinct skeletons, in generation order."""
    seen, problems, index = set(), [], 0
    while len(problems) < count:
        problem = problem_at(Split.TEST, index, seed=seed, difficulty=difficulty)
        index += 1
        key = json.dumps(problem.skeleton)
        if key not in seen:
            seen.add(key)
            problems.append(problem)
    return problems


def chat_messages(question: str) -> list[dict]:
    """The prompt the model is trained and evaluated on: the question as one user turn."""
    return [{"role": "user", "content": question}]


class ArithTrainingSet(torch.utils.data.Dataset):
    """`size` training problems, generated and tokenized on access (deterministic per index)."""

    def __init__(self, tokenizer, size: int, *, seed: int = 0, difficulty: Difficulty | None = None):
        self.tokenizer, self.size, self.seed = tokenizer, size, seed
        self.difficulty = (difficulty or Difficulty()).validate()

    def __len__(self) -> int:
        return self.size

    def __getitem__(self, index: int) -> dict:
        problem = problem_at(Split.TRAIN, index, seed=self.seed, difficulty=self.difficulty)
        return tokenize_chat_example(self.tokenizer, chat_messages(problem.question), problem.answer)


def tokenizer_corpus(count: int, *, seed: int = 0) -> list[str]:
    """Training text the tokenizer is fitted on (questions, chat scaffolding and solutions)."""
    texts = []
    for problem in generate(Split.TRAIN, count, seed=seed):
        texts += [problem.question, problem.answer, "user\nassistant\n"]
    return texts
