"""Training examples in the shape the collator takes: token ids and where the answer starts."""

from __future__ import annotations


def tokenize_chat_example(tokenizer, messages: list[dict], answer: str) -> dict:
    """`{"input_ids", "prompt_length"}` for a chat prompt (with the assistant header) and its answer.

    The answer ends with the tokenizer's eos token, which is the decoder's stop token.
    """
    prompt = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    prompt_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    answer_ids = tokenizer(answer + tokenizer.eos_token, add_special_tokens=False)["input_ids"]
    return {"input_ids": prompt_ids + answer_ids, "prompt_length": len(prompt_ids)}
