"""The lm-eval model `dllm_generation` end to end on a tiny random checkpoint, offline, through lm-eval's evaluator."""

from __future__ import annotations

from pathlib import Path

import pytest

pytest.importorskip("lm_eval")

REPO = Path(__file__).resolve().parents[1]
DATA = REPO.parent / "shared" / "data"
pytestmark = [pytest.mark.skipif(not DATA.is_dir(), reason=f"shared data folder {DATA} is absent"),
              pytest.mark.usefixtures("no_network")]


@pytest.fixture(scope="module")
def evaluator():
    import dllm_generation.lmeval  # noqa: F401  (registers the model)
    from dllm_generation.lmeval.compat import import_evaluator

    return import_evaluator()


def test_registered_under_its_name():
    import dllm_generation.lmeval
    from lm_eval.api.registry import get_model

    assert get_model("dllm_generation") is dllm_generation.lmeval.DllmGenerationLM


def test_gsm8k_and_mmlu_run_through_lm_eval(evaluator, tokenizer_path, tmp_path):
    from dllm_generation.lmeval.local_tasks import local_tasks, mmlu_tasks

    tasks = local_tasks(["gsm8k"], data_dir=str(DATA), workdir=str(tmp_path))
    tasks += mmlu_tasks(str(DATA / "mmlu"), str(tmp_path), subjects=["anatomy"])
    from lm_eval.api.registry import get_model

    args = (f"pretrained={tokenizer_path},dtype=float32,device=cpu,threshold=0.9,layer_reuse_k=2,"
            "layer_reuse_subset=first,layer_reuse_size=1,max_new_tokens=24")
    lm = get_model("dllm_generation").create_from_arg_string(args, {"batch_size": 2})  # what the CLI does
    results = evaluator.simple_evaluate(model=lm, tasks=tasks, num_fewshot=0, limit=2, apply_chat_template=True,
                                        fewshot_as_multiturn=True, log_samples=True)
    assert set(results["results"]) == {"gsm8k", "mmlu_anatomy"}
    gsm = results["samples"]["gsm8k"]
    assert len(gsm) == 4  # 2 docs x 2 filters
    # lm-eval rendered the chat prompt; the adapter rewrites it before tokenising (protocol fork).
    assert all(s["arguments"][0][0].endswith("Answer:<|im_end|>\n<|im_start|>assistant\n") for s in gsm)
    info = lm.get_model_info()["dllm_generation"]
    assert info["options"]["k"] == 2 and info["protocol"] == "fork"
    assert info["throughput"]["generated_tokens"] > 0 and info["throughput"]["reference_tokens"] > 0
    mmlu = results["samples"]["mmlu_anatomy"]
    assert len(mmlu) == 2 and all(len(s["resps"]) == 4 for s in mmlu)
    lls = [r[0][0] for r in mmlu[0]["resps"]]
    assert len(set(lls)) > 1 and all(ll < 0 for ll in lls)


def test_loglikelihood_equals_the_pipeline(tokenizer_path):
    """The adapter's loglikelihood is the pipeline's masked forward on the same (context, continuation)."""
    from lm_eval.api.instance import Instance

    from dllm_generation.eval.model_calls import loglikelihood_batch
    from dllm_generation.eval.prompts import encode_pair
    from dllm_generation.lmeval import DllmGenerationLM

    lm = DllmGenerationLM(pretrained=tokenizer_path, dtype="float32", device="cpu", batch_size=3)
    ctx = "<|im_start|>user\nWhat is 2+2?<|im_end|>\n<|im_start|>assistant\n"
    reqs = [Instance("loglikelihood", {}, (ctx, c), i, ("t", 0, 1)) for i, c in enumerate(["A", "(B)", " four"])]
    theirs = [ll for ll, _ in lm.loglikelihood(reqs)]
    pairs = [encode_pair(lm.tokenizer, ctx, c) for c in ["A", "(B)", " four"]]
    mine, _ = loglikelihood_batch(lm.model, [p[0] for p in pairs], [p[1] for p in pairs], 1,
                                  eos_token_id=lm.tokenizer.eos_token_id)
    assert theirs == pytest.approx(mine, abs=1e-5)


def test_bad_model_args_are_one_line_errors(tokenizer_path):
    from dllm_generation.eval.options import InvalidOptionError
    from dllm_generation.lmeval import DllmGenerationLM

    with pytest.raises(ValueError, match="unknown model_args \\['treshold'\\]"):
        DllmGenerationLM(pretrained=tokenizer_path, treshold=0.5)
    with pytest.raises(ValueError, match="protocol='papers' is not allowed"):
        DllmGenerationLM(pretrained=tokenizer_path, protocol="papers")
    with pytest.raises(InvalidOptionError, match="subset='top'"):
        DllmGenerationLM(pretrained=tokenizer_path, layer_reuse_k=2, layer_reuse_subset="top")
    if not __import__("torch").cuda.is_available():
        with pytest.raises(InvalidOptionError, match="fast_path='graphs' needs a CUDA device"):
            DllmGenerationLM(pretrained="/nonexistent/model", fast_path="graphs")  # refused before loading


def test_rolling_loglikelihood_is_a_clear_not_supported(tokenizer_path):
    from dllm_generation.lmeval import DllmGenerationLM

    lm = DllmGenerationLM(pretrained=tokenizer_path, dtype="float32", device="cpu")
    with pytest.raises(NotImplementedError, match="does not support loglikelihood_rolling"):
        lm.loglikelihood_rolling([])
