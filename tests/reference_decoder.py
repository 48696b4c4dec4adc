"""An independent, deliberately naive Fast-dLLM v2 decoder for one prompt (no caches at all).

Every forward recomputes the whole sequence through the stock transformers `Qwen2Model.forward`
with an explicit block-causal mask, so it shares no code with the library's runner, cache or
decoder. Without the block cache the library must give exactly these tokens and forward count.

It defines the sampler's behaviour: as upstream Fast-dLLM v2, a confidence is the softmax over
all logits (the mask token included) at the argmax; unlike upstream, the mask token itself can
never be the argmax. A stop token that the prefill or a commit forward produces ends the row:
no further block is denoised.
"""

from __future__ import annotations

import torch


def _block_causal_logits(model, seq: list[int], block_size: int) -> torch.Tensor:
    n = len(seq)
    idx = torch.arange(n)
    allowed = (idx[None, :] // block_size) <= (idx[:, None] // block_size)
    # A 4-D boolean mask is used as given by transformers (sdpa: True = attend).
    out = model.model(input_ids=torch.tensor([seq]), attention_mask=allowed[None, None],
                      position_ids=idx[None], use_cache=False)
    return model.lm_head(out.last_hidden_state)[0].float()


def reference_decode(model, prompt: list[int], *, block_size: int, small_block_size: int, threshold: float,
                     max_new_tokens: int, mask_id: int, eos: tuple[int, ...], pad_id: int):
    """Returns (new tokens cut and stop-padded, number of forwards)."""
    bs, sbs = block_size, small_block_size
    forwards = 0
    x = list(prompt)
    length = len(x)
    finished = False
    stopped = False  # the next block's first token, from the prefill or a commit, is a stop token

    def confident(logits):
        """(confidence, token): softmax over every logit, then the best token other than the mask."""
        probs = torch.softmax(logits, dim=-1)
        probs[..., mask_id] = 0.0
        return probs.max(dim=-1)

    def greedy_last(seq):
        return int(confident(_block_causal_logits(model, seq, bs)[-1])[1])

    if length >= bs:
        forwards += 1  # prefill of the whole prompt blocks
        if length % bs == 0:
            tok = greedy_last(x)
            x.append(tok)
            stopped = tok in eos
    generated: list[int] = []
    while True:
        start = (len(x) // bs) * bs
        if stopped:
            generated.append(x[start])
            break
        known = len(x) - start
        block = x[start:] + [mask_id] * (bs - known)
        prompt_in_block = max(0, length - start)
        for sub in range(bs // sbs):
            lo, hi = sub * sbs, (sub + 1) * sbs
            while any(t == mask_id for t in block[lo:hi]):
                lg = _block_causal_logits(model, x[:start] + block, bs)[start:start + bs]
                forwards += 1
                shifted = torch.cat([lg[:1], lg[:-1]])[lo:hi]
                conf, tok = confident(shifted)
                masked = torch.tensor([t == mask_id for t in block[lo:hi]])
                conf = torch.where(masked, conf, torch.full_like(conf, -float("inf")))
                unmask = conf > threshold
                unmask[conf.argmax()] = True
                unmask &= masked
                for j in range(sbs):
                    if unmask[j]:
                        block[lo + j] = int(tok[j])
                        finished = finished or int(tok[j]) in eos
        generated.extend(block[prompt_in_block:])
        if finished or len(generated) >= max_new_tokens:
            break
        x = x[:start] + block
        forwards += 1  # commit
        tok = greedy_last(x)
        x.append(tok)
        stopped = tok in eos
    generated = generated[:max_new_tokens]
    for i, t in enumerate(generated):
        if t in eos:
            generated = generated[: i + 1] + [pad_id] * (len(generated) - i - 1)
            break
    return generated, forwards
