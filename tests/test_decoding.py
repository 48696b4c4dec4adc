"""Core decoding: upstream equivalence, batch invariance, forward accounting, edge lengths."""

from __future__ import annotations

import pytest
import torch
from conftest import TINY_MASK, generate_new_tokens
from reference_decoder import reference_decode

from dllm_generation.config import resolve_settings
from dllm_generation.decoding import BlockDiffusionDecoder
from dllm_generation.runner import LayerStackRunner
from dllm_generation.testing import random_prompts

LENGTHS = [5, 31, 32, 33, 64, 70]
BASE = dict(block_size=32, small_block_size=8, threshold=0.9)


def prompts_of(lengths, seed=1):
    return random_prompts(lengths, TINY_MASK - 8, seed=seed)


def decode_with_trace(model, prompt, **gen_kwargs):
    """Run the decoder directly (one prompt) and return (tokens, stats, trace)."""
    from transformers import GenerationConfig

    runner = LayerStackRunner(model)
    settings = resolve_settings(GenerationConfig(**gen_kwargs), model.generation_config, model.config,
                                num_layers=runner.num_layers)
    decoder = BlockDiffusionDecoder(runner, settings, trace=True)
    out = decoder.decode([prompt])
    return out[0], decoder.stats.as_dict(), decoder.trace


@pytest.mark.parametrize("length", LENGTHS)
def test_batch_one_matches_naive_reference_without_block_cache(tiny_model, length):
    prompt = prompts_of([length], seed=length)[0]
    eos = (TINY_MASK - 1,)
    got, stats = generate_new_tokens(tiny_model, [prompt], max_new_tokens=70, use_block_cache=False, **BASE)
    want, forwards = reference_decode(tiny_model, prompt, block_size=32, small_block_size=8, threshold=0.9,
                                      max_new_tokens=70, mask_id=TINY_MASK, eos=eos,
                                      pad_id=tiny_model.generation_config.pad_token_id)
    assert got[0][: len(want)] == want
    assert stats["forwards"] == forwards
    assert stats["sub_block_forwards"] == 0


def _stop_ids_in_different_blocks(alone):
    """Pick stop ids so that rows stop in blocks 0, 1 and 2 (and others may never stop)."""
    chosen: list[int] = []
    for block_idx in (0, 1, 2):
        lo = block_idx * 32 + 4
        for row in alone:
            pick = next((t for t in row[lo:(block_idx + 1) * 32]
                         if t not in chosen and all(t not in other[:lo] for other in alone)), None)
            if pick is not None:
                chosen.append(pick)
                break
    return chosen


@pytest.mark.parametrize("use_block_cache", [False, True])
def test_batch_invariance_mixed_lengths_and_padding(tiny_model, use_block_cache):
    prompts = prompts_of(LENGTHS)
    kw = dict(max_new_tokens=96, use_block_cache=use_block_cache, **BASE)
    free = [generate_new_tokens(tiny_model, [p], **kw)[0][0] for p in prompts]
    stops = _stop_ids_in_different_blocks(free)
    assert len(stops) == 3, "test setup: could not find stop tokens in different blocks"
    kw["eos_token_id"] = stops
    alone = [generate_new_tokens(tiny_model, [p], **kw)[0][0] for p in prompts]
    pad = tiny_model.generation_config.pad_token_id
    # Rows really do stop in different blocks, and some run to the end.
    stop_blocks = set()
    for row in alone:
        idx = next((i for i, t in enumerate(row) if t in stops), None)
        stop_blocks.add(None if idx is None else idx // 32)
    assert len(stop_blocks) >= 3, stop_blocks
    for side in ("left", "right"):
        batched, stats = generate_new_tokens(tiny_model, prompts, side=side, **kw)
        for a, b in zip(alone, batched):
            assert b[: len(a)] == a
            assert all(t == pad for t in b[len(a):])


def test_rows_all_stop_in_first_block_short_and_boundary_prompts(tiny_model):
    prompts = prompts_of(LENGTHS, seed=7)
    free = [generate_new_tokens(tiny_model, [p], max_new_tokens=64, **BASE)[0][0] for p in prompts]
    # Each row's first generated token is a stop token: every row finishes inside its first block.
    stops = sorted({row[0] for row in free})
    outs, stats = generate_new_tokens(tiny_model, prompts, max_new_tokens=64, eos_token_id=stops, **BASE)
    pad = tiny_model.generation_config.pad_token_id
    for row in outs:
        first_stop = next(i for i, t in enumerate(row) if t in stops)
        assert first_stop < 32
        assert all(t == pad for t in row[first_stop + 1:])
    assert stats["commit_forwards"] == 0


def test_threshold_one_unmasks_one_token_per_step(tiny_model):
    prompt = prompts_of([40], seed=3)[0]
    tokens, stats, trace = decode_with_trace(tiny_model, prompt, max_new_tokens=56, threshold=1.0,
                                             block_size=32, small_block_size=8, use_block_cache=False)
    assert all(len(u) == 1 for step in trace for u in step["unmasked"])
    # 24 masks in the first block (8 prompt tokens), 31 in the second (its first token comes from
    # the commit forward); one prefill and one commit.
    assert stats["block_forwards"] == 24 + 31
    assert stats["forwards"] == 1 + 24 + 1 + 31
    assert stats["prefill_forwards"] == 1 and stats["commit_forwards"] == 1


def replay_block_cache_kinds(trace, block_size=32, small=8, prompt_tail=0):
    """Recompute, from the unmasking order alone, which forward kind each step must use."""
    expected = []
    known_by_block: dict[int, set[int]] = {}
    seen_block: set[int] = set()
    for step in trace:
        b = step["block"]
        known = known_by_block.setdefault(b, (set(range(prompt_tail)) if b == 0 else set()) | {0})
        sub = step["sub"][0]
        first_known = (sub * small) in known
        expected.append("sub" if (b in seen_block and first_known) else "block")
        seen_block.add(b)
        known.update(step["unmasked"][0])
    return expected


@pytest.mark.parametrize("length", [40, 64])
def test_block_cache_uses_sub_block_forwards_exactly_where_the_algorithm_says(tiny_model, length):
    prompt = prompts_of([length], seed=11)[0]
    _, stats, trace = decode_with_trace(tiny_model, prompt, max_new_tokens=64, threshold=1.0,
                                        block_size=32, small_block_size=8, use_block_cache=True)
    kinds = [s["kind"] for s in trace]
    assert kinds == replay_block_cache_kinds(trace, prompt_tail=length % 32)
    assert all(s["tokens"] == (8 if s["kind"] == "sub" else 32) for s in trace)
    assert stats["sub_block_forwards"] > 0
    assert stats["sub_block_forwards"] + stats["block_forwards"] == len(trace)


@pytest.mark.parametrize("length", [5, 33, 64])
def test_block_cache_is_exact_when_the_sub_block_is_the_whole_block(tiny_model, length):
    """With small_block_size == block_size a sub-block forward re-forwards all 32 tokens, so it
    rewrites the whole block's K/V exactly as a full forward would. With 8-token sub-blocks the
    fast path attends to K/V of the other sub-blocks computed at an earlier step (stale by
    design), so the two paths may legitimately differ there."""
    prompt = prompts_of([length], seed=5)[0]
    kw = dict(max_new_tokens=64, block_size=32, small_block_size=32, threshold=0.9)
    off, s_off = generate_new_tokens(tiny_model, [prompt], use_block_cache=False, **kw)
    on, s_on = generate_new_tokens(tiny_model, [prompt], use_block_cache=True, **kw)
    assert on == off
    assert s_on["sub_block_forwards"] > 0 and s_off["sub_block_forwards"] == 0


def test_max_new_tokens_cuts_output_but_whole_blocks_are_decoded(tiny_model):
    prompt = prompts_of([10], seed=2)[0]
    short, s1 = generate_new_tokens(tiny_model, [prompt], max_new_tokens=5, **BASE)
    full, s2 = generate_new_tokens(tiny_model, [prompt], max_new_tokens=22, **BASE)
    assert len(short[0]) == 5 and short[0] == full[0][:5]
    assert s1["forwards"] == s2["forwards"]  # the first block (22 new slots) is decoded either way


def test_sampling_is_per_row_and_seeded(tiny_model):
    from transformers import GenerationConfig

    from conftest import pad_batch

    prompt = prompts_of([20], seed=9)[0]
    ids, mask = pad_batch([prompt, prompt, prompt, prompt])
    cfg = GenerationConfig(max_new_tokens=32, do_sample=True, temperature=1.5, top_p=0.95, **BASE)
    torch.manual_seed(0)
    a = tiny_model.generate(input_ids=ids, attention_mask=mask, generation_config=cfg)
    torch.manual_seed(0)
    b = tiny_model.generate(input_ids=ids, attention_mask=mask, generation_config=cfg)
    assert torch.equal(a, b)
    rows = {tuple(r) for r in a[:, ids.shape[1]:].tolist()}
    assert len(rows) > 1, "every row is sampled, not only row 0"
    gen = torch.Generator().manual_seed(1)
    c = tiny_model.generate(input_ids=ids, attention_mask=mask, generation_config=cfg, generator=gen)
    gen = torch.Generator().manual_seed(1)
    d = tiny_model.generate(input_ids=ids, attention_mask=mask, generation_config=cfg, generator=gen)
    assert torch.equal(c, d)


def test_streamer_receives_prompt_then_the_returned_tokens(tiny_model):
    class Collect:
        def __init__(self):
            self.chunks, self.ended = [], False

        def put(self, value):
            self.chunks.append(value.tolist())

        def end(self):
            self.ended = True

    prompt = prompts_of([12], seed=4)[0]
    s = Collect()
    from transformers import GenerationConfig

    out = tiny_model.generate(torch.tensor([prompt]), generation_config=GenerationConfig(max_new_tokens=40, **BASE),
                              streamer=s)
    assert s.ended and s.chunks[0] == prompt
    streamed = [t for c in s.chunks[1:] for t in c]
    new = out[0, len(prompt):].tolist()
    stop = tiny_model.generation_config.eos_token_id
    real = new[: new.index(stop) + 1] if stop in new else new
    assert len(new) == 40 and streamed == real


def test_stats_report_tokens_and_rates(tiny_model):
    _, stats = generate_new_tokens(tiny_model, prompts_of([7, 40]), max_new_tokens=30, **BASE)
    assert stats["generated_tokens"] == 60
    assert stats["tokens_per_forward"] == pytest.approx(60 / stats["forwards"])
    assert stats["layer_calls"] == 4 * stats["forwards"] and stats["layer_calls_skipped"] == 0
    assert tiny_model.last_generation_stats == stats


# ---------------------------------------------------------------------------- stop tokens from prefill/commit
def _reference(model, prompt, **kw):
    return reference_decode(model, prompt, block_size=32, small_block_size=8, threshold=kw.get("threshold", 0.9),
                            max_new_tokens=kw["max_new_tokens"], mask_id=TINY_MASK, eos=tuple(kw["eos_token_id"]),
                            pad_id=model.generation_config.pad_token_id)


@pytest.mark.parametrize("path", [False, "uncaptured"])
def test_stop_token_from_a_commit_ends_the_row_without_denoising_another_block(tiny_model, path):
    prompt = prompts_of([40], seed=11)[0]  # 8 prompt tokens in the first block: 24 generated there
    kw = dict(max_new_tokens=96, use_block_cache=False, **BASE)
    free, _ = generate_new_tokens(tiny_model, [prompt], fast_path=path, **kw)
    commit_token = free[0][24]  # the second block's first token comes from the commit forward
    assert commit_token not in free[0][:24], "test setup: the commit token must be new"
    kw["eos_token_id"] = [commit_token]
    got, stats = generate_new_tokens(tiny_model, [prompt], fast_path=path, **kw)
    pad = tiny_model.generation_config.pad_token_id
    assert got[0][:25] == free[0][:25] and all(t == pad for t in got[0][25:])
    assert stats["commit_forwards"] == 1 and stats["prefill_forwards"] == 1
    # Exactly the forwards of the first block: the row does not denoise the block its stop token opened.
    _, _, trace = decode_with_trace(tiny_model, prompt, **{k: v for k, v in kw.items() if k != "eos_token_id"})
    first_block_steps = sum(1 for step in trace if step["block"] == 0)
    assert stats["block_forwards"] + stats["sub_block_forwards"] == first_block_steps
    want, forwards = _reference(tiny_model, prompt, **kw)
    assert got[0][: len(want)] == want and stats["forwards"] == forwards == 1 + first_block_steps + 1


@pytest.mark.parametrize("path", [False, "uncaptured"])
def test_stop_token_from_the_prefill_ends_the_row_with_no_denoising(tiny_model, path):
    prompt = prompts_of([64], seed=13)[0]  # whole blocks only: the prefill gives the first new token
    kw = dict(max_new_tokens=64, use_block_cache=True, **BASE)
    free, _ = generate_new_tokens(tiny_model, [prompt], fast_path=path, **kw)
    kw["eos_token_id"] = [free[0][0]]
    got, stats = generate_new_tokens(tiny_model, [prompt], fast_path=path, **kw)
    pad = tiny_model.generation_config.pad_token_id
    assert got[0][0] == free[0][0] and all(t == pad for t in got[0][1:])
    assert stats["forwards"] == stats["prefill_forwards"] == 1 and stats["denoising_steps"] == 0
    assert stats["generated_tokens"] == 1
    want, forwards = _reference(tiny_model, prompt, **kw)
    assert want[0] == free[0][0] and forwards == 1


def test_a_row_stopped_by_its_commit_leaves_the_others_unchanged(tiny_model):
    prompts = prompts_of([40, 5, 70], seed=11)
    kw = dict(max_new_tokens=96, use_block_cache=False, **BASE)
    free = [generate_new_tokens(tiny_model, [p], **kw)[0][0] for p in prompts]
    stop = free[0][24]
    kw["eos_token_id"] = [stop]
    alone = [generate_new_tokens(tiny_model, [p], **kw)[0][0] for p in prompts]
    assert alone[0].index(stop) == 24  # row 0 ends at its commit token
    batched, _ = generate_new_tokens(tiny_model, prompts, **kw)
    pad = tiny_model.generation_config.pad_token_id
    for a, b in zip(alone, batched):
        assert b[: len(a)] == a and all(t == pad for t in b[len(a):])


# ---------------------------------------------------------------------------- confidences
def test_confidence_is_the_softmax_over_the_whole_vocabulary_mask_included():
    from dllm_generation.sampling import choose_tokens

    logits = torch.tensor([[3.0, 1.0, 0.0, 2.9], [0.0, 5.0, 1.0, 0.5]])  # mask id 3 nearly ties in row 0
    tokens, conf = choose_tokens(logits, mask_token_id=3)
    full = torch.softmax(logits, dim=-1)
    assert tokens.tolist() == [0, 1]  # the mask token is never chosen
    assert torch.allclose(conf, full[[0, 1], [0, 1]])
    assert conf[0] < 0.5 < full[0, 0] / (1 - full[0, 3])  # renormalising without the mask would claim > 0.5
    # The mask token ranked first: the best other token is chosen, with its full-softmax probability.
    tokens, conf = choose_tokens(torch.tensor([[1.0, 0.0, 9.0]]), mask_token_id=2)
    assert tokens.tolist() == [0] and conf.item() == pytest.approx(torch.softmax(torch.tensor([1.0, 0.0, 9.0]), 0)[0].item())


def test_sampled_confidence_keeps_the_mask_in_the_distribution_but_never_draws_it():
    from dllm_generation.sampling import choose_tokens

    logits = torch.tensor([[2.0, 1.0, 2.0]]).expand(2000, 3)  # mask id 2 as likely as token 0
    gen = torch.Generator().manual_seed(0)
    tokens, conf = choose_tokens(logits, temperature=1.0, top_p=1.0, generator=gen, mask_token_id=2)
    probs = torch.softmax(logits[0], 0)
    assert 2 not in tokens.tolist() and {0, 1} == set(tokens.tolist())
    assert torch.allclose(conf, probs[tokens])
    # top-p keeping only the mask token: the draw falls back to the other tokens.
    tokens, _ = choose_tokens(torch.tensor([[0.0, 0.0, 12.0]]), temperature=1.0, top_p=0.5, generator=gen,
                              mask_token_id=2)
    assert tokens.item() in (0, 1)


@pytest.fixture(scope="module")
def mask_tied_model(tiny_path):
    """The tiny model with the mask token's output row equal to that of the token most often chosen:
    wherever that token leads, the mask token takes half its probability, so confidences computed
    without the mask (renormalised) cross the 0.9 threshold where the full-softmax ones do not."""
    from dllm_generation import load_model

    model, _ = load_model(tiny_path, dtype=torch.float32)
    free, _ = generate_new_tokens(model, prompts_of([40], seed=14), max_new_tokens=64, **BASE)
    favourite = max(set(free[0]), key=free[0].count)
    with torch.no_grad():
        model.lm_head.weight[TINY_MASK] = model.lm_head.weight[favourite]
    return model


@pytest.mark.parametrize("use_block_cache", [False, True])
def test_near_threshold_decisions_match_the_reference_when_the_mask_token_is_likely(mask_tied_model, use_block_cache,
                                                                                    monkeypatch):
    from dllm_generation import sampling
    from dllm_generation.engines import eager

    model = mask_tied_model
    prompt = prompts_of([40], seed=14)[0]
    kw = dict(max_new_tokens=64, use_block_cache=use_block_cache, eos_token_id=[TINY_MASK - 1], **BASE)
    plain, ps = generate_new_tokens(model, [prompt], fast_path=False, **kw)
    fast, fs = generate_new_tokens(model, [prompt], fast_path="uncaptured", **kw)
    assert fast == plain and fs["forwards"] == ps["forwards"]
    if not use_block_cache:
        want, forwards = _reference(model, prompt, **kw)
        assert plain[0][: len(want)] == want and ps["forwards"] == forwards

    def renormalised_without_mask(logits, **kwargs):  # the definition this test guards against
        logits = logits.clone()
        logits[..., TINY_MASK] = -float("inf")
        return sampling.choose_tokens(logits, **kwargs)

    monkeypatch.setattr(eager, "choose_tokens", renormalised_without_mask)
    other, _ = generate_new_tokens(model, [prompt], fast_path=False, **kw)
    assert other != plain, "test setup: the two confidence definitions must lead to different decisions here"
