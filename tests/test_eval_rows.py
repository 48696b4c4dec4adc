"""Rows the model cannot decode stop the run with one line naming the row, before the first batch.

A row whose text holds the mask token (the decoder generates where the mask id stands, so it
would write over the user's text) or whose prompt cannot fit the model's positions at the run's
budget is refused after the model loads (its tokenizer is needed to see it) and before anything
is decoded or the folder changes; fixing or removing the row and rerunning succeeds.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from dllm_generation.arith import data as arith_data
from dllm_generation.eval import runner as runner_module
from dllm_generation.eval.cli import main

ARITH = ["--limit", "4", "--batch-size", "2", "--max-new-tokens", "16", "--no-warmup"]


def rows_with(tmp_path: Path, index: int, **changes) -> str:
    rows = [json.loads(line) for line in Path(arith_data.test_set_path()).read_text().splitlines()[:4]]
    rows[index].update(changes)
    path = tmp_path / "rows.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def one_error_line(err: str) -> str:
    lines = [line for line in err.splitlines() if line.startswith("error: ")]
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


@pytest.fixture()
def no_decoding(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("nothing may be decoded")

    monkeypatch.setattr(runner_module, "generate_batch", refuse)


@pytest.mark.parametrize("question, expected", [
    ("Ann has 3 |<MASK>| apples. How many apples does Ann have now?",
     "field 'question' holds the mask token '|<MASK>|' (id 3)"),
    ("How many? " + "x " * 3000, "beyond the model's max_position_embeddings=2048"),
], ids=["mask token in the text", "too long for the model"])
def test_a_row_the_model_cannot_decode_is_refused_naming_it(question, expected, tmp_path, capsys, no_decoding):
    data = rows_with(tmp_path, 2, question=question)
    out = tmp_path / "out"
    assert main("arith", [*ARITH, "--data-files", data, "--output-dir", str(out)]) == 1
    line = one_error_line(capsys.readouterr().err)
    assert line.startswith("error: row 'arith-test-0-2': ") and expected in line
    assert not out.exists()  # nothing was written


def test_a_row_with_a_null_field_is_refused_before_the_model_loads(tmp_path, capsys, monkeypatch):
    import dllm_generation

    monkeypatch.setattr(dllm_generation, "load_model", lambda *a, **k: (_ for _ in ()).throw(AssertionError("loaded")))
    data = rows_with(tmp_path, 1, question=None)
    assert main("arith", [*ARITH, "--data-files", data, "--output-dir", str(tmp_path / "out")]) == 1
    line = one_error_line(capsys.readouterr().err)
    assert "line 2 has field 'question' = null" in line and "allowed:" in line


@pytest.mark.parametrize("flag", ["--k", "--subset", "--mode", "--size"])
def test_an_empty_grid_list_is_refused_not_run_as_nothing(flag, tmp_path, capsys):
    from dllm_generation.eval.cli import grid_main

    with pytest.raises(SystemExit) as stopped:
        grid_main(["--task", "arith", flag, "", "--output-dir", str(tmp_path / "out")])
    assert stopped.value.code == 2
    assert f"{flag} is empty (allowed: a comma-separated list of" in capsys.readouterr().err
