"""`arith`: seeded multi-step arithmetic word problems with step-by-step solutions.

Each problem is a start amount and a chain of operations (add, take away, multiply, share
equally, add equal groups). The solution states one equation per step and ends with
`#### <number>`, the GSM8K answer format, so the GSM8K scorer applies unchanged.

Train and test are disjoint by construction: a problem's split is a hash of its *arithmetic
skeleton* (start value, operations and operands), not of its wording, so no test chain of
equations ever appears in training, whatever names and objects dress it.
"""

from __future__ import annotations

import hashlib
import json
import random
from dataclasses import asdict, dataclass, field
from enum import Enum


class Split(str, Enum):
    TRAIN = "train"
    TEST = "test"


# One test problem in TEST_SHARE_DENOMINATOR skeletons; the rest are training problems.
TEST_SHARE_DENOMINATOR = 20

NAMES = (
    ("Ava", "she", "her"), ("Ben", "he", "his"), ("Cara", "she", "her"), ("Dan", "he", "his"),
    ("Eli", "he", "his"), ("Fay", "she", "her"), ("Gus", "he", "his"), ("Hana", "she", "her"),
    ("Ivan", "he", "his"), ("Jade", "she", "her"), ("Kai", "he", "his"), ("Lena", "she", "her"),
    ("Max", "he", "his"), ("Nora", "she", "her"), ("Omar", "he", "his"), ("Pia", "she", "her"),
    ("Raj", "he", "his"), ("Sara", "she", "her"), ("Tom", "he", "his"), ("Uma", "she", "her"),
)
ITEMS = ("apples", "stickers", "marbles", "coins", "books", "shells", "cards", "pens", "eggs", "stamps",
         "beads", "rocks", "cookies", "toys", "flowers", "balloons")
FRIENDS = ("a friend", "a neighbor", "a cousin", "a classmate", "the teacher")
CONTAINERS = ("boxes", "bags", "jars", "packs", "baskets")


class Op(str, Enum):
    ADD = "add"
    SUB = "sub"
    MUL = "mul"  # the amount is multiplied by a small factor
    DIV = "div"  # the amount is shared equally; one share is kept
    GROUPS = "groups"  # n containers of m items are added: two steps (n * m, then +)


@dataclass(frozen=True)
class Difficulty:
    """Knobs of the generator; every field bounds what a problem may contain."""

    min_steps: int = 2  # equations in the solution
    max_steps: int = 6
    max_operand: int = 30  # largest number added or taken away, and the largest start amount
    max_factor: int = 5  # largest multiplier, divisor and container count
    max_value: int = 300  # no intermediate amount exceeds this

    def validate(self) -> "Difficulty":
        if not 1 <= self.min_steps <= self.max_steps:
            raise ValueError(f"difficulty: need 1 <= min_steps <= max_steps, got min_steps={self.min_steps}, "
                             f"max_steps={self.max_steps}")
        if self.max_operand < 2 or self.max_factor < 2:
            raise ValueError(f"difficulty: max_operand and max_factor must be >= 2, got {self.max_operand}, "
                             f"{self.max_factor}")
        if self.max_value < self.max_operand * 2:
            raise ValueError(f"difficulty: max_value={self.max_value} must be at least 2 * max_operand")
        return self


@dataclass
class Problem:
    """One problem: GSM8K-style `question` and `answer` (worked solution ending in `#### n`)."""

    id: str
    question: str
    answer: str
    final: int
    steps: int
    skeleton: list = field(default_factory=list)

    def to_json(self) -> str:
        return json.dumps(asdict(self), ensure_ascii=False)


def skeleton_split(skeleton: list) -> Split:
    """The split a skeleton belongs to: a hash, so membership never depends on generation order."""
    digest = hashlib.sha256(json.dumps(skeleton).encode()).digest()
    return Split.TEST if int.from_bytes(digest[:8], "big") % TEST_SHARE_DENOMINATOR == 0 else Split.TRAIN


def _choose_op(rng: random.Random, value: int, steps_left: int, d: Difficulty):
    """A random operation valid for `value`, as (op, operands, steps it uses), or None."""
    options = []
    if value + 1 <= d.max_value:
        options.append(Op.ADD)
    if value >= 2:
        options.append(Op.SUB)
    if value * 2 <= d.max_value:
        options.append(Op.MUL)
    if any(value % q == 0 for q in range(2, d.max_factor + 1)) and value >= 4:
        options.append(Op.DIV)
    if steps_left >= 2 and value + 4 <= d.max_value:
        options.append(Op.GROUPS)
    op = rng.choice(options)
    if op is Op.ADD:
        return op, [rng.randint(1, min(d.max_operand, d.max_value - value))], 1
    if op is Op.SUB:
        return op, [rng.randint(1, min(d.max_operand, value - 1))], 1
    if op is Op.MUL:
        return op, [rng.randint(2, min(d.max_factor, d.max_value // value))], 1
    if op is Op.DIV:
        return op, [rng.choice([q for q in range(2, d.max_factor + 1) if value % q == 0])], 1
    count = rng.randint(2, min(d.max_factor, (d.max_value - value) // 2))
    size = rng.randint(2, max(2, min(d.max_operand // 2, (d.max_value - value) // count)))
    return op, [count, size], 2


def _apply(op: Op, value: int, operands: list[int]) -> int:
    if op is Op.ADD:
        return value + operands[0]
    if op is Op.SUB:
        return value - operands[0]
    if op is Op.MUL:
        return value * operands[0]
    if op is Op.DIV:
        return value // operands[0]
    return value + operands[0] * operands[1]


def _sample_skeleton(rng: random.Random, d: Difficulty) -> tuple[int, list]:
    target = rng.randint(d.min_steps, d.max_steps)
    while True:
        value = rng.randint(2, d.max_operand)
        start, chain, used = value, [], 0
        while used < target:
            op, operands, cost = _choose_op(rng, value, target - used, d)
            value = _apply(op, value, operands)
            chain.append([op.value, *operands])
            used += cost
        if used == target:
            return start, chain


def _render(rng: random.Random, start: int, chain: list, pid: str) -> Problem:
    name, subj, poss = rng.choice(NAMES)
    item = rng.choice(ITEMS)
    cap = subj.capitalize()
    question = [f"{name} has {start} {item}."]
    solution = [f"{name} starts with {start} {item}."]
    value = start
    for op_name, *operands in chain:
        op = Op(op_name)
        new = _apply(op, value, operands)
        if op is Op.ADD:
            question.append(f"{cap} gets {operands[0]} more {item}.")
            solution.append(f"{cap} gets {operands[0]} more, so {subj} has {value} + {operands[0]} = {new} {item}.")
        elif op is Op.SUB:
            friend = rng.choice(FRIENDS)
            question.append(f"{cap} gives {operands[0]} {item} to {friend}.")
            solution.append(f"{cap} gives away {operands[0]}, so {subj} has {value} - {operands[0]} = {new} {item}.")
        elif op is Op.MUL:
            question.append(f"Then {subj} ends up with {operands[0]} times as many {item}.")
            solution.append(f"{cap} has {operands[0]} times as many, so {subj} has {value} * {operands[0]} = {new} {item}.")
        elif op is Op.DIV:
            question.append(f"{cap} splits {poss} {item} equally into {operands[0]} groups and keeps one group.")
            solution.append(f"{cap} keeps one of {operands[0]} equal groups, so {subj} has {value} / {operands[0]} = "
                            f"{new} {item}.")
        else:
            count, size = operands
            container = rng.choice(CONTAINERS)
            question.append(f"{cap} buys {count} {container} with {size} {item} in each.")
            solution.append(f"The {container} hold {count} * {size} = {count * size} {item}.")
            solution.append(f"So {subj} has {value} + {count * size} = {new} {item}.")
        value = new
    question.append(f"How many {item} does {name} have now?")
    answer = "\n".join(solution) + f"\n#### {value}"
    steps = sum(2 if Op(c[0]) is Op.GROUPS else 1 for c in chain)
    return Problem(pid, " ".join(question), answer, value, steps, [start, chain])


def generate(split: Split | str, count: int, *, seed: int = 0, difficulty: Difficulty | None = None,
             start_index: int = 0) -> list[Problem]:
    """`count` problems of `split`, deterministic in (`split`, `seed`, `difficulty`, index).

    Problem i is drawn from a generator seeded with (seed, split, i) until its skeleton hashes to
    `split`, so problem i never changes when more problems are asked for.
    """
    split = Split(split)
    d = (difficulty or Difficulty()).validate()
    return [problem_at(split, i, seed=seed, difficulty=d) for i in range(start_index, start_index + count)]


def problem_at(split: Split, index: int, *, seed: int = 0, difficulty: Difficulty | None = None) -> Problem:
    """The `index`-th problem of `split` (see `generate`)."""
    d = difficulty or Difficulty()
    rng = random.Random(f"arith/{seed}/{split.value}/{index}")
    while True:
        start, chain = _sample_skeleton(rng, d)
        if skeleton_split([start, chain]) is split:
            return _render(rng, start, chain, f"arith-{split.value}-{seed}-{index}")
