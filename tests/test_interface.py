"""HF integration: loading, attach, pipeline, config round trips, input validation, cache API."""

from __future__ import annotations

import json
import os

import pytest
import torch
from conftest import TINY_MASK, pad_batch
from transformers import GenerationConfig, pipeline

from dllm_generation import (
    BlockDiffusionCache,
    BlockDiffusionQwen2ForCausalLM,
    LayerReuseConfig,
    attach_block_diffusion,
    load_model,
)
from dllm_generation.testing import random_prompts

BASE = dict(block_size=32, small_block_size=8, threshold=0.9, max_new_tokens=16)


def test_hub_format_loads_into_transformers_qwen2_without_remote_code(tiny_path):
    with open(os.path.join(tiny_path, "config.json")) as f:
        raw = json.load(f)
    assert raw["model_type"] == "Fast_dLLM_Qwen" and "auto_map" in raw and raw["bd_size"] == 32
    model, _ = load_model(tiny_path)
    assert isinstance(model, BlockDiffusionQwen2ForCausalLM)
    assert model.config.model_type == "qwen2"
    assert model.generation_config.mask_token_id == TINY_MASK
    assert model.generation_config.block_size == 32


def test_tokenizer_checkpoint_reads_mask_id_and_decodes_text(tokenizer_path):
    model, tok = load_model(tokenizer_path)
    assert model.generation_config.mask_token_id == 151665 == tok.convert_tokens_to_ids("|<MASK>|")
    assert model.generation_config.pad_token_id == tok.pad_token_id
    msgs = [[{"role": "user", "content": "What is 2+2?"}], [{"role": "user", "content": "Say hi."}]]
    texts = [tok.apply_chat_template(m, tokenize=False, add_generation_prompt=True) for m in msgs]
    tok.padding_side = "left"
    enc = tok(texts, return_tensors="pt", padding=True)
    out = model.generate(**enc, generation_config=GenerationConfig(**BASE))
    assert out.shape[0] == 2 and out.shape[1] > enc["input_ids"].shape[1]
    assert all(isinstance(t, str) for t in tok.batch_decode(out[:, enc["input_ids"].shape[1]:]))


def test_text_generation_pipeline(tokenizer_path):
    model, tok = load_model(tokenizer_path)
    pipe = pipeline("text-generation", model=model, tokenizer=tok)
    cfg = GenerationConfig(layer_reuse=LayerReuseConfig(k=2, subset="last", size=1), **BASE)
    result = pipe("Hello there", generation_config=cfg)
    assert result[0]["generated_text"].startswith("Hello there")
    assert model.last_generation_stats["layer_calls_skipped"] > 0


def test_generation_config_round_trip_with_diffusion_fields(tmp_path):
    reuse = LayerReuseConfig(k=3, subset="middle", size=6, mode="residual")
    cfg = GenerationConfig(use_block_cache=False, layer_reuse=reuse, mask_token_id=5, **BASE)
    blob = json.loads(cfg.to_json_string())
    assert blob["layer_reuse"] == reuse.to_dict()
    cfg.save_pretrained(tmp_path)
    back = GenerationConfig.from_pretrained(tmp_path)
    assert back.block_size == 32 and back.small_block_size == 8 and back.threshold == 0.9
    assert back.use_block_cache is False and back.mask_token_id == 5
    assert LayerReuseConfig.coerce(back.layer_reuse) == reuse


def test_reloaded_config_decodes_like_the_original(tiny_model, tmp_path):
    reuse = LayerReuseConfig(k=2, subset="first", size=2)
    cfg = GenerationConfig(layer_reuse=reuse, **BASE)
    cfg.save_pretrained(tmp_path)
    back = GenerationConfig.from_pretrained(tmp_path)
    assert isinstance(back.layer_reuse, dict)
    ids, mask = pad_batch(random_prompts([9, 40], 500, seed=3))
    a = tiny_model.generate(input_ids=ids, attention_mask=mask, generation_config=cfg)
    sa = tiny_model.last_generation_stats
    b = tiny_model.generate(input_ids=ids, attention_mask=mask, generation_config=back)
    assert torch.equal(a, b) and tiny_model.last_generation_stats["layer_calls_skipped"] == sa["layer_calls_skipped"] > 0


def test_attach_to_a_loaded_qwen2_shares_weights_and_leaves_it_untouched(tiny_path):
    from transformers import Qwen2ForCausalLM

    from dllm_generation.loading import config_from_hub_dict

    with open(os.path.join(tiny_path, "config.json")) as f:
        config, _ = config_from_hub_dict(json.load(f))
    plain = Qwen2ForCausalLM.from_pretrained(tiny_path, config=config)
    view = attach_block_diffusion(plain, mask_token_id=TINY_MASK)
    assert type(plain) is Qwen2ForCausalLM and isinstance(view, BlockDiffusionQwen2ForCausalLM)
    assert view.lm_head.weight.data_ptr() == plain.lm_head.weight.data_ptr()
    assert plain.generation_config.__dict__.get("mask_token_id") is None
    loaded, _ = load_model(tiny_path)
    ids = torch.tensor([random_prompts([20], 500, seed=1)[0]])
    cfg = GenerationConfig(**BASE)
    assert torch.equal(view.generate(ids, generation_config=cfg), loaded.generate(ids, generation_config=cfg))


def test_attach_rejects_unsupported_architecture():
    from transformers import GPT2Config, GPT2LMHeadModel

    model = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=50))
    with pytest.raises(ValueError, match="unsupported architecture"):
        attach_block_diffusion(model)


def test_load_rejects_unsupported_model_type(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "gpt2"}))
    with pytest.raises(ValueError, match="unsupported architecture.*gpt2"):
        load_model(str(tmp_path))


class ComputeGuard:
    """Counts embedding calls: validation must fail before any forward."""

    def __init__(self, model):
        self.calls = 0
        self.handle = model.model.embed_tokens.register_forward_pre_hook(self._hook)

    def _hook(self, *_):
        self.calls += 1

    def close(self):
        self.handle.remove()


@pytest.mark.parametrize(
    "overrides, field",
    [
        (dict(small_block_size=12), "small_block_size"),
        (dict(block_size=0), "block_size"),
        (dict(small_block_size=-8), "small_block_size"),
        (dict(threshold=0.0), "threshold"),
        (dict(threshold=1.5), "threshold"),
        (dict(max_new_tokens=0), "max_new_tokens"),
        (dict(max_new_tokens=5000), "max_position_embeddings"),
        (dict(layer_reuse=LayerReuseConfig(k=2, subset="first", size=4)), "size"),
        (dict(layer_reuse=LayerReuseConfig(k=2, layers=[1, 9])), "layers"),
        (dict(num_beams=2), "num_beams"),
        (dict(do_sample=True, temperature=float("nan")), "temperature must be a finite number"),
    ],
)
def test_bad_generation_input_fails_before_compute(tiny_model, overrides, field):
    cfg = GenerationConfig(**BASE)
    for key, value in overrides.items():  # set after construction: GenerationConfig validates some itself
        setattr(cfg, key, value)
    guard = ComputeGuard(tiny_model)
    try:
        with pytest.raises(ValueError, match=field):
            tiny_model.generate(torch.tensor([[1, 2, 3]]), generation_config=cfg)
    finally:
        guard.close()
    assert guard.calls == 0


def test_missing_mask_id_empty_batch_and_empty_row_fail_before_compute(tiny_model):
    guard = ComputeGuard(tiny_model)
    saved = tiny_model.generation_config.mask_token_id
    try:
        tiny_model.generation_config.mask_token_id = None
        saved_cfg = getattr(tiny_model.config, "mask_token_id", None)
        tiny_model.config.mask_token_id = None
        with pytest.raises(ValueError, match="mask_token_id"):
            tiny_model.generate(torch.tensor([[1, 2, 3]]), generation_config=GenerationConfig(**BASE))
        tiny_model.config.mask_token_id = saved_cfg
        tiny_model.generation_config.mask_token_id = saved
        with pytest.raises(ValueError, match="empty batch"):
            tiny_model.generate(torch.zeros((0, 4), dtype=torch.long), generation_config=GenerationConfig(**BASE))
        with pytest.raises(ValueError, match="row 1 is empty"):
            tiny_model.generate(torch.tensor([[1, 2], [3, 4]]), attention_mask=torch.tensor([[1, 1], [0, 0]]),
                                generation_config=GenerationConfig(**BASE))
    finally:
        tiny_model.generation_config.mask_token_id = saved
        guard.close()
    assert guard.calls == 0


def test_model_is_not_patched_by_generate_even_on_error(tiny_model):
    layer = tiny_model.model.layers[1]
    before = (dict(vars(layer)).keys(), type(layer).forward, layer.forward.__func__)
    hooks_before = [len(m._forward_hooks) + len(m._forward_pre_hooks) for m in tiny_model.modules()]
    cfg = GenerationConfig(layer_reuse=LayerReuseConfig(k=2, layers=[1]), **BASE)
    tiny_model.generate(torch.tensor([[1, 2, 3]]), generation_config=cfg)

    def boom(*_):
        raise RuntimeError("boom")

    h = tiny_model.model.layers[2].register_forward_pre_hook(boom)
    with pytest.raises(RuntimeError, match="boom"):
        tiny_model.generate(torch.tensor([[1, 2, 3]]), generation_config=cfg)
    h.remove()
    after = (dict(vars(layer)).keys(), type(layer).forward, layer.forward.__func__)
    assert before == after
    assert hooks_before == [len(m._forward_hooks) + len(m._forward_pre_hooks) for m in tiny_model.modules()]


def test_cache_batch_select_reorder_crop_reset():
    cache = BlockDiffusionCache(num_layers=2, batch_size=3, capacity=64, block_size=32)
    rows = torch.arange(3)
    k = torch.randn(3, 2, 32, 4)
    cache.begin_forward("append", rows=None, row_index=rows)
    for i in range(2):
        cache.update(k + i, k - i, i)
        cache.layers[i].store_reuse(torch.zeros(3, 32, 8), torch.ones(3, 32, 8) * torch.arange(3)[:, None, None],
                                    torch.zeros(3, dtype=torch.long))
    cache.advance(32)
    assert cache.get_seq_length() == 32
    cache.batch_select_indices(torch.tensor([2, 0]))
    assert cache.num_rows == 2
    for i, layer in enumerate(cache.layers):
        assert layer.keys.shape[0] == 2 and torch.equal(layer.keys[0, :, :32], k[2] + i)
        assert layer.reuse_output.shape[0] == 2 and layer.reuse_input.shape[0] == 2
        assert torch.equal(layer.reuse_output[:, 0, 0], torch.tensor([2.0, 0.0]))
    cache.reorder_cache(torch.tensor([1, 0]))
    assert torch.equal(cache.layers[0].keys[0, :, :32], k[0])
    cache.crop(-16)
    assert cache.get_seq_length() == 16
    assert cache.layers[0].reuse_output is None  # entries of a cropped cache are dropped, not kept stale
    with pytest.raises(ValueError):
        cache.crop(40)
    cache.reset()
    assert cache.get_seq_length() == 0 and cache.layers[0].keys.abs().sum() == 0


def test_attach_to_a_llama_model_decodes_like_the_naive_reference():
    from reference_decoder import reference_decode
    from transformers import LlamaConfig, LlamaForCausalLM

    from dllm_generation import BlockDiffusionLlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256)
    plain = LlamaForCausalLM(config).eval()
    with torch.no_grad():
        for p in plain.parameters():
            p.normal_(0, 0.5)
    view = attach_block_diffusion(plain, mask_token_id=127)
    assert isinstance(view, BlockDiffusionLlamaForCausalLM) and type(plain) is LlamaForCausalLM
    prompt = random_prompts([37], 120, seed=6)[0]
    cfg = GenerationConfig(max_new_tokens=40, block_size=32, small_block_size=8, threshold=0.9,
                           use_block_cache=False, eos_token_id=126, pad_token_id=125)
    got = view.generate(torch.tensor([prompt]), generation_config=cfg)[0, len(prompt):].tolist()
    want, forwards = reference_decode(plain, prompt, block_size=32, small_block_size=8, threshold=0.9,
                                      max_new_tokens=40, mask_id=127, eos=(126,), pad_id=125)
    assert got[: len(want)] == want and view.last_generation_stats["forwards"] == forwards


# ---------------------------------------------------------------------------- what generate cannot honour
@pytest.mark.parametrize(
    "kwargs, named",
    [
        (lambda: {"logits_processor": __import__("transformers").LogitsProcessorList(
            [__import__("transformers").TemperatureLogitsWarper(0.5)])}, "logits_processor"),
        (lambda: {"stopping_criteria": __import__("transformers").StoppingCriteriaList(
            [__import__("transformers").MaxLengthCriteria(8)])}, "stopping_criteria"),
        (lambda: {"prefix_allowed_tokens_fn": lambda batch, ids: [1]}, "prefix_allowed_tokens_fn"),
        (lambda: {"past_key_values": BlockDiffusionCache(4, 1, 32, 32)}, "past_key_values"),
        (lambda: {"synced_gpus": True}, "synced_gpus"),
        (lambda: {"foo": 1}, "foo"),
        (lambda: {"repetition_penalty": 1.3}, "repetition_penalty=1.3"),
        (lambda: {"output_scores": True}, "output_scores=True"),
        (lambda: {"stop_strings": ["\n"]}, "stop_strings"),
        (lambda: {"do_sample": True, "temperature": 0.7, "top_k": 20}, "top_k=20"),
    ],
)
def test_generate_refuses_what_it_cannot_honour_before_compute(tiny_model, kwargs, named):
    guard = ComputeGuard(tiny_model)
    try:
        with pytest.raises(ValueError, match=f"cannot honour: .*{named}") as err:
            tiny_model.generate(torch.tensor([[1, 2, 3]]), generation_config=GenerationConfig(**BASE), **kwargs())
    finally:
        guard.close()
    assert guard.calls == 0 and "\n" not in str(err.value)


def test_generate_accepts_neutral_arguments_and_ignores_inherited_ar_defaults(tiny_path, caplog):
    from transformers import LogitsProcessorList, StoppingCriteriaList

    model, _ = load_model(tiny_path)
    ids = torch.tensor([[1, 2, 3]])
    base = model.generate(ids, generation_config=GenerationConfig(**BASE))
    same = model.generate(ids, generation_config=GenerationConfig(**BASE), use_cache=True, synced_gpus=False,
                          logits_processor=LogitsProcessorList(), stopping_criteria=StoppingCriteriaList(),
                          repetition_penalty=1.0, top_k=50)  # top_k only matters when sampling
    assert torch.equal(base, same)
    # An instruct checkpoint's own AR defaults (no config passed by the caller) are ignored with a warning.
    model.generation_config.repetition_penalty = 1.05
    model.generation_config.max_new_tokens = 16
    with caplog.at_level("WARNING", logger="dllm_generation.generation"):
        assert torch.equal(model.generate(ids), base)
    assert "repetition_penalty=1.05" in caplog.text


def test_prompt_ids_outside_the_vocabulary_fail_before_compute(tiny_model):
    guard = ComputeGuard(tiny_model)
    try:
        with pytest.raises(ValueError, match=r"input_ids row 1 holds token id 600 outside the model's vocabulary \(allowed: 0\.\.511\)"):
            tiny_model.generate(torch.tensor([[1, 2, 3], [4, 600, 5]]), generation_config=GenerationConfig(**BASE))
        with pytest.raises(ValueError, match="token id -3"):
            tiny_model.generate(torch.tensor([[1, -3, 3]]), generation_config=GenerationConfig(**BASE))
    finally:
        guard.close()
    assert guard.calls == 0
    # Padding is not a prompt token: whatever id it holds is never embedded.
    tiny_model.generate(torch.tensor([[-1, 2, 3]]), attention_mask=torch.tensor([[0, 1, 1]]),
                        generation_config=GenerationConfig(**BASE))
    from dllm_generation import loglikelihood

    with pytest.raises(ValueError, match="continuations row 0 holds token id 512"):
        loglikelihood(tiny_model, [[1, 2]], [[512]])


@pytest.mark.parametrize("position", [2, 40], ids=["last partial block", "whole prompt block"])
def test_a_mask_id_inside_the_prompt_is_refused_before_compute(tiny_model, position):
    """The decoder generates where the mask id stands: one in the prompt would be decoded over
    (and `sequences` would still show the prompt's), so it is refused, naming row and position."""
    prompt = random_prompts([45], TINY_MASK - 8, seed=3)[0]
    prompt[position] = TINY_MASK
    guard = ComputeGuard(tiny_model)
    try:
        with pytest.raises(ValueError, match=rf"input_ids row 1 holds the mask token id {TINY_MASK} at position {position} "
                                             rf"\(allowed: any id but {TINY_MASK}"):
            tiny_model.generate(torch.tensor([random_prompts([45], TINY_MASK - 8, seed=4)[0], prompt]),
                                generation_config=GenerationConfig(**BASE))
    finally:
        guard.close()
    assert guard.calls == 0
    # The mask id as left padding is not part of the prompt.
    tiny_model.generate(torch.tensor([[TINY_MASK, 2, 3]]), attention_mask=torch.tensor([[0, 1, 1]]),
                        generation_config=GenerationConfig(**BASE))


@pytest.mark.parametrize("ids, message", [
    (torch.tensor([[1.5, 2.0, 3.0]]), r"input_ids dtype torch.float32 is not allowed \(allowed: an integer dtype"),
    (torch.tensor([[True, False, True]]), r"input_ids dtype torch.bool is not allowed"),
    (torch.ones((2, 3, 4), dtype=torch.long), r"input_ids has 3 dimensions, shape \(2, 3, 4\) \(allowed: 2"),
    ([[1, 2, 3]], r"input_ids must be a tensor of token ids, got list"),
], ids=["float", "bool", "3-D", "list"])
def test_input_ids_of_the_wrong_dtype_or_shape_fail_before_compute(tiny_model, ids, message):
    guard = ComputeGuard(tiny_model)
    try:
        with pytest.raises(ValueError, match=message):
            tiny_model.generate(ids, generation_config=GenerationConfig(**BASE))
    finally:
        guard.close()
    assert guard.calls == 0


def test_max_length_counts_the_input_as_transformers_does(tiny_model, caplog):
    ids = torch.tensor([random_prompts([5], TINY_MASK - 8, seed=5)[0]])
    saved = tiny_model.generation_config.max_new_tokens
    tiny_model.generation_config.max_new_tokens = 40  # the model's default must not win over the call's max_length
    try:
        out = tiny_model.generate(ids, max_length=25)
        assert out.shape == (1, 25)
        assert torch.equal(out, tiny_model.generate(ids, max_new_tokens=20))
        explicit = GenerationConfig(**{**BASE, "max_new_tokens": None}, max_length=25)
        assert tiny_model.generate(ids, generation_config=explicit).shape == (1, 25)
        with caplog.at_level("WARNING", logger="dllm_generation.generation"):  # as transformers: max_new_tokens wins
            assert tiny_model.generate(ids, max_length=25, max_new_tokens=8).shape == (1, 13)
        assert "max_new_tokens takes precedence" in caplog.text
        guard = ComputeGuard(tiny_model)
        try:
            with pytest.raises(ValueError, match=r"max_length=5 leaves no room for new tokens after the 5-token input"):
                tiny_model.generate(ids, max_length=5)
        finally:
            guard.close()
        assert guard.calls == 0
    finally:
        tiny_model.generation_config.max_new_tokens = saved


def test_attach_refusal_names_what_attach_supports_not_what_it_refused():
    from transformers import Qwen2Config, Qwen2Model

    model = Qwen2Model(Qwen2Config(num_hidden_layers=1, hidden_size=16, intermediate_size=32, num_attention_heads=2,
                                   num_key_value_heads=1, vocab_size=32))
    with pytest.raises(ValueError) as err:
        attach_block_diffusion(model)
    message = str(err.value)
    assert "attach_block_diffusion got Qwen2Model" in message
    assert "attaches to instances of Qwen2ForCausalLM, LlamaForCausalLM" in message
    assert "Qwen2Model" not in message.split("attaches to")[1]

    class Fast_dLLM_QwenForCausalLM(__import__("transformers").Qwen2ForCausalLM):  # as trust_remote_code builds it
        pass

    cfg = Qwen2Config(num_hidden_layers=1, hidden_size=16, intermediate_size=32, num_attention_heads=2,
                      num_key_value_heads=1, vocab_size=32)
    remote = Fast_dLLM_QwenForCausalLM(cfg)
    remote.config.model_type = "Fast_dLLM_Qwen"
    with pytest.raises(ValueError) as err:
        attach_block_diffusion(remote)
    message = str(err.value)
    assert "Fast_dLLM_QwenForCausalLM" not in message.split("attaches to")[1].split(".")[0]
    assert "load_model(path)" in message


def test_pipeline_does_not_call_this_librarys_classes_unsupported(tokenizer_path):
    import logging

    records = []

    class Keep(logging.Handler):
        def emit(self, record):
            records.append(record.getMessage())

    handler = Keep(level=logging.DEBUG)
    logger = logging.getLogger("transformers.pipelines.base")
    logger.addHandler(handler)
    try:
        model, tok = load_model(tokenizer_path)
        pipeline("text-generation", model=model, tokenizer=tok)
        from transformers import Qwen2ForCausalLM

        class SomeOtherQwen2(Qwen2ForCausalLM):
            pass

        other = SomeOtherQwen2(model.config)
        pipeline("text-generation", model=other, tokenizer=tok)  # any other class name is still reported
    finally:
        logger.removeHandler(handler)
    unsupported = [m for m in records if "is not supported for" in m]
    assert len(unsupported) == 1 and unsupported[0].startswith("The model 'SomeOtherQwen2'")


def test_public_names_and_version():
    from importlib.metadata import version

    import dllm_generation

    assert {"release", "loglikelihood", "LayerReuseConfig", "load_model"} <= set(dllm_generation.__all__)
    assert "DiffusionSettings" not in dllm_generation.__all__ and not hasattr(dllm_generation, "DiffusionSettings")
    assert all(hasattr(dllm_generation, name) for name in dllm_generation.__all__)
    assert dllm_generation.__version__ == version("dllm_generation")
