"""The README's usage example runs as written (on a tiny checkpoint and the CPU instead of the 7B on CUDA)."""

from __future__ import annotations

from pathlib import Path

README = Path(__file__).resolve().parents[1] / "README.md"


def test_readme_use_example_runs_as_written(tokenizer_path, capsys):
    section = README.read_text().split("\n## Use\n", 1)[1].split("\n## ", 1)[0]
    code = section.split("```python\n", 1)[1].split("```", 1)[0]
    # Only the checkpoint and the device change: the example itself is executed as printed.
    assert code.count('"Efficient-Large-Model/Fast_dLLM_v2_7B"') == 1 and code.count('"cuda"') == 2
    code = (code.replace('"Efficient-Large-Model/Fast_dLLM_v2_7B"', repr(tokenizer_path))
                .replace('"cuda"', '"cpu"').replace('dtype="bfloat16"', 'dtype="float32"'))
    namespace: dict = {}
    exec(compile(code, str(README), "exec"), namespace)
    printed = capsys.readouterr().out
    assert "layer_calls_skipped" in printed  # print(out.stats)
    assert namespace["out"].stats["layer_calls_skipped"] > 0  # LayerReuseConfig(k=2, subset="first") ran reuse
    assert len(namespace["out"].sequences) == 2
