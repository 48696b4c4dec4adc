"""The small-M kernel for few-token passes (gate/up as one product) and where the engine uses it.

The kernel itself needs a Hopper GPU (its tests skip elsewhere). On the CPU the pass's few-token
variant runs with `F.linear` standing in for the kernel, so the dispatch and the fused MLP are
checked against the eager engine's tokens in float32."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from dllm_generation.decoding import BlockDiffusionDecoder
from dllm_generation.engines import packed_pass
from dllm_generation.engines.projections import fuse_projections
from dllm_generation.engines.small_m_linear import MAX_TOKENS, small_m_linear, support_reason
from dllm_generation.runner import LayerStackRunner
from test_compiled_layers import _plain_decode_and_engine

ON_HOPPER = torch.cuda.is_available() and support_reason(torch.device("cuda"), torch.bfloat16, 37888, 3584) is None


def test_the_kernel_is_used_only_where_it_was_measured():
    cpu = torch.device("cpu")
    assert "not CUDA" in support_reason(cpu, torch.bfloat16, 128, 64)
    if torch.cuda.is_available():
        cuda = torch.device("cuda")
        assert "float32" in support_reason(cuda, torch.float32, 128, 64)
        if ON_HOPPER:
            assert "multiple of the tile" in support_reason(cuda, torch.bfloat16, 100, 64)


def test_gate_and_up_share_one_storage_and_the_mlp_computes_what_it_did(tiny_model):
    mlp = tiny_model.model.layers[0].mlp
    x = torch.randn(5, tiny_model.config.hidden_size)
    before = mlp(x)
    gate, up = mlp.gate_proj.weight.clone(), mlp.up_proj.weight.clone()
    weight, bias = fuse_projections((mlp.gate_proj, mlp.up_proj))
    assert bias is None and torch.equal(weight, torch.cat([gate, up]))
    for proj in (mlp.gate_proj, mlp.up_proj):
        assert proj.weight.untyped_storage().data_ptr() == weight.untyped_storage().data_ptr()
    assert torch.equal(mlp(x), before)
    assert fuse_projections((mlp.gate_proj, mlp.up_proj))[0].data_ptr() == weight.data_ptr()  # nothing moves twice


def test_few_token_passes_take_the_fused_gate_up_and_keep_the_eager_tokens(tiny_model, monkeypatch):
    """Batch 3 (24-token sub-block passes, 96-token whole-block passes) and batch 1 (8 and 32): every
    product of the few-token variant has at most MAX_TOKENS tokens, larger passes call the MLP
    module, and the tokens equal the eager engine's."""
    sizes = []

    def linear_standing_in_for_the_kernel(x, weight):
        sizes.append(x.shape[0])
        return F.linear(x, weight)

    monkeypatch.setattr(packed_pass, "small_m_linear", linear_standing_in_for_the_kernel)
    for lengths, seed in (([5, 33, 70], 4), ([40], 0)):
        runner, settings, prompts, want, engine = _plain_decode_and_engine(tiny_model, lengths, seed,
                                                                           compile_layers=False)
        assert engine.describe()["few_token_gate_up"] == "the MLP's own products (the layer functions run uncompiled)"
        packed = engine.packed  # as `set_layer_functions` sets it up for compiled functions on a Hopper GPU
        packed.gate_up = [fuse_projections((layer.mlp.gate_proj, layer.mlp.up_proj))[0] for layer in runner.layers]
        packed.post_few = packed.math.post_attention_few_tokens
        module_sizes = []

        def packed_mlp_call(module, args, out):  # the prefill calls the MLP through transformers' layers, in 3-D
            if args[0].dim() == 2:
                module_sizes.append(args[0].shape[0])

        hooks = [layer.mlp.register_forward_hook(packed_mlp_call) for layer in runner.layers]
        try:
            sizes.clear()
            assert BlockDiffusionDecoder(runner, settings, engine=engine).decode(prompts) == want
        finally:
            for hook in hooks:
                hook.remove()
        assert sizes and max(sizes) <= MAX_TOKENS
        if len(lengths) > 1:
            assert min(module_sizes) > MAX_TOKENS  # whole-block passes of 3 rows, commits
        else:
            assert not module_sizes and set(sizes) == {8, 32}


def test_gate_and_up_with_biases_keep_the_mlp_module(tiny_model, monkeypatch):
    """The kernel multiplies without a bias: a model whose gate/up have biases (Llama's `mlp_bias`)
    keeps its MLP module in every pass, and says why."""
    monkeypatch.setattr(packed_pass, "support_reason", lambda *args: None)
    model = type(tiny_model)(tiny_model.config).eval()
    for layer in model.model.layers:
        layer.mlp.up_proj.bias = torch.nn.Parameter(torch.zeros(layer.mlp.up_proj.out_features))
    runner = LayerStackRunner(model)
    packed = packed_pass.PackedPass(runner, compile_layers=True)
    assert packed.gate_up is None and packed.post_few is None
    assert packed.few_token_gate_up == "the MLP's own products (gate/up have biases (the kernel multiplies without))"


@pytest.mark.skipif(not ON_HOPPER, reason="the small-M kernel runs on Hopper GPUs")
@pytest.mark.parametrize("tokens", [1, 8, 17, 32])
def test_the_kernel_equals_a_float32_product_to_bf16_rounding_and_each_row_is_its_own(tokens):
    torch.manual_seed(tokens)
    weight = torch.randn(4096, 3584, device="cuda", dtype=torch.bfloat16) * 0.02
    x = torch.randn(tokens, 3584, device="cuda", dtype=torch.bfloat16)
    got = small_m_linear(x, weight)
    want = x.float() @ weight.float().T
    assert got.dtype == torch.bfloat16 and got.shape == (tokens, 4096)
    assert ((got.float() - want).abs() <= 2 ** -8 * want.abs() + 1e-3).all()
    assert torch.equal(small_m_linear(x, weight), got)  # deterministic
    for row in range(tokens):  # a row's result does not depend on the other rows of the pass
        assert torch.equal(small_m_linear(x[row:row + 1], weight), got[row:row + 1])


@pytest.mark.slow
def test_the_compiled_few_token_variant_compiles_once_beside_the_other_layer_functions(tiny_model, monkeypatch):
    """Compiled, with the kernel's support faked on the CPU (`F.linear` standing in): batch 1 passes
    (8 and 32 tokens) and a batch-3 decode (both variants) give the eager engine's tokens, and the
    three layer functions compile once each, all of them in the first decode (whose passes need only
    the few-token variant), so that no later decode stops to compile."""
    monkeypatch.setattr(packed_pass, "support_reason", lambda *args: None)
    monkeypatch.setattr(packed_pass, "small_m_linear", lambda x, weight: F.linear(x, weight))
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    runner, settings, larger, want_larger, engine = _plain_decode_and_engine(tiny_model, [5, 33, 70], 4,
                                                                             compile_layers=True)
    assert engine.packed.post_few is not None and engine.describe()["few_token_gate_up"] == "small-M kernel"
    single = [larger[1]]
    want_single = BlockDiffusionDecoder(runner, settings).decode(single)
    for prompts, want in ((single, want_single), (larger, want_larger)):
        assert BlockDiffusionDecoder(runner, settings, engine=engine).decode(prompts) == want
        assert engine.describe()["compile_failure"] is None
        assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == 3
