"""What the model is asked, per task, as chat turns and as plain text.

Every prompt is built once as chat messages (few-shot examples as earlier user/assistant turns,
as lm-eval's `--fewshot_as_multiturn`) and once as plain text, so `--no-chat-template` changes
the rendering only, not the content. Rendering to token ids needs the tokenizer and lives here
too, so the runner never formats text itself.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from .data import LETTERS
BOXED_INSTRUCTION = "Please reason step by step, and put your final answer within \\boxed{}."
MMLU_INSTRUCTION = "Answer with the letter of the correct option, in the form 'Answer: X'."
GPQA_INSTRUCTION = (
    "Answer the following multiple choice question. The last line of your response should be of the "
    "following format: 'Answer: $LETTER' (without quotes) where LETTER is one of ABCD. "
    "Think step by step before answering."
)


@dataclass
class Prompt:
    messages: list[dict]
    plain: str


def build_prompt(task: str, doc: dict, fewshot: dict, *, mmlu_mode: str = "loglikelihood") -> Prompt:
    """The prompt for one row; `fewshot` is the pool from `data.TaskData.fewshot`."""
    if task == "gsm8k":
        return _gsm8k(doc, fewshot.get("", []))
    if task == "math":
        return _single_turn(f"{doc['problem']}\n{BOXED_INSTRUCTION}")
    if task == "ifeval":
        return _single_turn(doc["prompt"])
    if task == "mmlu":
        return _mmlu(doc, fewshot.get(doc["subject"], []), generative=mmlu_mode == "generative")
    if task == "arith":
        return _single_turn(doc["question"])  # as the demo model was trained: the question alone
    if task == "gpqa":
        return _single_turn(f"{GPQA_INSTRUCTION}\n\n{doc['question']}\n\n{_options(doc['choices'], ') ')}")
    raise ValueError(f"unknown task {task!r}")


def mmlu_continuations(chat_template: bool) -> list[str]:
    """The four scored answers: the assistant turn starts fresh in chat, after 'Answer:' in plain text."""
    return list(LETTERS) if chat_template else [" " + letter for letter in LETTERS]


def render_prompt(tokenizer, prompt: Prompt, *, chat_template: bool) -> list[int]:
    """Token ids of the prompt, with the chat template's assistant header when `chat_template`."""
    if chat_template:
        if not getattr(tokenizer, "chat_template", None):
            raise ValueError(
                "chat_template is on but the tokenizer has no chat template; pass --no-chat-template "
                "or a tokenizer folder that has one (--tokenizer)"
            )
        text = tokenizer.apply_chat_template(prompt.messages, add_generation_prompt=True, tokenize=False)
    else:
        text = prompt.plain
    return tokenizer(text, add_special_tokens=False)["input_ids"]


# ---------------------------------------------------------------------------- tasks
def _single_turn(text: str) -> Prompt:
    return Prompt([{"role": "user", "content": text}], text + "\n")


def _gsm8k(doc: dict, shots: list[dict]) -> Prompt:
    messages, plain = [], []
    for shot in shots:
        question = f"{shot['question']}\n{BOXED_INSTRUCTION}"
        answer = gsm8k_worked_answer(shot["answer"])
        messages += [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]
        plain.append(f"Question: {question}\nAnswer: {answer}\n\n")
    question = f"{doc['question']}\n{BOXED_INSTRUCTION}"
    messages.append({"role": "user", "content": question})
    plain.append(f"Question: {question}\nAnswer:")
    return Prompt(messages, "".join(plain))


def gsm8k_worked_answer(answer: str) -> str:
    """A GSM8K training answer as a worked solution: calculator tags dropped, `#### x` boxed."""
    body, _, final = answer.partition("####")
    body = re.sub(r"<<[^>]*>>", "", body).strip()
    return f"{body}\nThe final answer is \\boxed{{{final.strip()}}}."


def _options(choices: list[str], sep: str) -> str:
    return "\n".join(f"{letter}{sep}{choice}" for letter, choice in zip(LETTERS, choices))


def _mmlu_question(doc: dict, generative: bool) -> str:
    text = f"{doc['question'].strip()}\n{_options(doc['choices'], '. ')}\n"
    return text + (f"{MMLU_INSTRUCTION}\nAnswer:" if generative else "Answer:")


def _mmlu(doc: dict, shots: list[dict], *, generative: bool) -> Prompt:
    """lm-eval's MMLU format: subject header, question, A-D options, 'Answer:'."""
    subject = doc["subject"].replace("_", " ")
    header = f"The following are multiple choice questions (with answers) about {subject}.\n\n"
    messages, plain = [], [header]
    for i, shot in enumerate(shots):
        question = _mmlu_question(shot, generative)
        reply = f"Answer: {shot['answer_letter']}" if generative else shot["answer_letter"]
        messages += [
            {"role": "user", "content": (header if i == 0 else "") + question},
            {"role": "assistant", "content": reply},
        ]
        plain.append(f"{question} {shot['answer_letter']}\n\n")
    question = _mmlu_question(doc, generative)
    messages.append({"role": "user", "content": (header if not shots else "") + question})
    plain.append(question)
    return Prompt(messages, "".join(plain))
