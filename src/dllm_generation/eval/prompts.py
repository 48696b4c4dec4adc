"""What the model is asked, per task: lm-evaluation-harness 0.4.9's task formats, as chat turns and plain text.

Each prompt is what lm-eval renders for the task named in `protocols.LM_EVAL_TASK` under
`--apply_chat_template --fewshot_as_multiturn`: the task `description` becomes the system message
(replacing the template's default one), few-shot rows become earlier user/assistant turns, and
the question is the last user turn. Without the chat template the same pieces are joined as
lm-eval joins them (description, then `text target\\n\\n` per shot, then the question).

The reference model class then edits the rendered text (`protocols.reference_rewrite`): for GSM8K
and the MATH tasks, "Answer:" / "Solution:" become the boxed-answer instruction, quirks included.
Rendering and tokenising live here too, so the runner never formats text itself.
"""

from __future__ import annotations

from dataclasses import dataclass

from .data import LETTERS
from .protocols import LM_EVAL_TASK, reference_rewrite

MMLU_INSTRUCTION = "Answer with the letter of the correct option, in the form 'Answer: X'."
GPQA_DESCRIPTION = (
    "Here are some example questions from experts. Answer the final question yourself, following the format "
    "of the previous questions exactly.\n"
)
# lm-eval's defaults for the pieces between few-shot examples.
TARGET_DELIMITER = " "
FEWSHOT_DELIMITER = "\n\n"


@dataclass
class Prompt:
    messages: list[dict]
    plain: str
    task: str  # the lm-eval task name the rewrite keys on


def build_prompt(task: str, doc: dict, fewshot: dict, *, mmlu_mode: str = "loglikelihood") -> Prompt:
    """The prompt for one row; `fewshot` is the pool from `data.TaskData.fewshot`."""
    name = LM_EVAL_TASK[task]
    if task == "gsm8k":
        return _single(f"Question: {doc['question']}\nAnswer:", name)
    if task in ("math", "minerva_math"):
        return _single(f"Problem:\n{doc['problem']}\n\nSolution:", name)
    if task == "ifeval":
        return _single(doc["prompt"], name)
    if task == "arith":
        return _single(doc["question"], name)  # as the demo model was trained: the question alone
    if task == "mmlu":
        shots = fewshot.get(doc["subject"], [])
        generative = mmlu_mode == "generative"
        examples = [(mmlu_text(s, generative), (f"Answer: {s['answer_letter']}" if generative else s["answer_letter"]))
                    for s in shots]
        return _with_description(mmlu_description(doc["subject"]), examples, mmlu_text(doc, generative), name)
    if task == "gpqa":
        return _with_description(GPQA_DESCRIPTION, [], gpqa_text(doc), name)
    raise ValueError(f"unknown task {task!r}")


def continuations(task: str, chat_template: bool) -> list[str]:
    """The scored answers of a loglikelihood task: lm-eval drops the target delimiter under a chat template."""
    choices = list(LETTERS) if task == "mmlu" else [f"({letter})" for letter in LETTERS]
    return choices if chat_template else [TARGET_DELIMITER + c for c in choices]


def render_text(tokenizer, prompt: Prompt, *, chat_template: bool) -> str:
    """The prompt text the model reads: chat-rendered (or plain), then the reference's rewrite."""
    if chat_template:
        if not getattr(tokenizer, "chat_template", None):
            raise ValueError(
                "chat_template is on but the tokenizer has no chat template; use a protocol without it "
                "(--protocol custom --no-chat-template) or a tokenizer folder that has one (--tokenizer)"
            )
        text = tokenizer.apply_chat_template(prompt.messages, add_generation_prompt=True, tokenize=False)
    else:
        text = prompt.plain
    return reference_rewrite(prompt.task, text)


def render_prompt(tokenizer, prompt: Prompt, *, chat_template: bool) -> list[int]:
    """Token ids of the prompt, tokenised as the reference model class does (the tokenizer's defaults)."""
    return tokenizer(render_text(tokenizer, prompt, chat_template=chat_template))["input_ids"]


def encode_pair(tokenizer, context: str, continuation: str) -> tuple[list[int], list[int]]:
    """The reference's split: tokenise context + continuation whole, the continuation is what follows
    the context's own token count."""
    whole = tokenizer(context + continuation)["input_ids"]
    context_ids = tokenizer(context)["input_ids"]
    return context_ids, whole[len(context_ids):]


# ---------------------------------------------------------------------------- task texts
def mmlu_description(subject: str) -> str:
    return f"The following are multiple choice questions (with answers) about {subject.replace('_', ' ')}.\n\n"


def mmlu_text(doc: dict, generative: bool = False) -> str:
    c = doc["choices"]
    text = f"{doc['question'].strip()}\nA. {c[0]}\nB. {c[1]}\nC. {c[2]}\nD. {c[3]}\n"
    return text + (f"{MMLU_INSTRUCTION}\nAnswer:" if generative else "Answer:")


def gpqa_text(doc: dict) -> str:
    c = doc["choices"]
    return f"Question: {doc['Question']}\nChoices:\n(A) {c[0]}\n(B) {c[1]}\n(C) {c[2]}\n(D) {c[3]}\nAnswer:"


def _single(text: str, name: str) -> Prompt:
    return Prompt([{"role": "user", "content": text}], text, name)


def _with_description(description: str, examples: list[tuple[str, str]], question: str, name: str) -> Prompt:
    messages = [{"role": "system", "content": description}]
    plain = [description]
    for text, target in examples:
        messages += [{"role": "user", "content": text}, {"role": "assistant", "content": target}]
        plain.append(f"{text}{TARGET_DELIMITER}{target}{FEWSHOT_DELIMITER}")
    messages.append({"role": "user", "content": question})
    plain.append(question)
    return Prompt(messages, "".join(plain), name)
