"""lm-evaluation-harness adapter: run any lm-eval task through this library's block-diffusion decoding.

`pip install -e ".[lmeval]"`, then

    dllm-lm-eval --model dllm_generation \
        --model_args pretrained=Efficient-Large-Model/Fast_dLLM_v2_7B,threshold=0.9,layer_reuse_k=2,layer_reuse_subset=first \
        --tasks gsm8k --num_fewshot 0 --apply_chat_template --fewshot_as_multiturn --batch_size 1

`dllm-lm-eval` is lm-eval's own command line with the model registered: lm-eval 0.4.9 finds
models only in its registry and has no plugin entry point, so `import dllm_generation.lmeval`
(which registers ``dllm_generation``) must run first. In Python:
`import dllm_generation.lmeval; lm_eval.simple_evaluate(model="dllm_generation", ...)`.
`local_tasks` builds lm-eval's own task objects over local data files for offline machines.
"""

from .adapter import MODEL_NAME, DllmGenerationLM

__all__ = ["MODEL_NAME", "DllmGenerationLM"]
