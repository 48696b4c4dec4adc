"""A run folder belongs to one process, and a run name is one folder inside the output root.

The holder here is a real run in another process, stopped inside its model load (the moment a
second process could otherwise slip in), so these tests show what a second run does to a folder
that is in use, not what a lock object does in isolation.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from dllm_generation.eval.cli import grid_main, main

ARITH = ["--limit", "4", "--batch-size", "2", "--max-new-tokens", "16", "--no-warmup"]

HOLDER = textwrap.dedent("""
    import sys
    import dllm_generation
    from dllm_generation.eval import cli

    def held(*args, **kwargs):  # the model load never ends until the test says so
        print("holding", flush=True)
        sys.stdin.readline()
        raise SystemExit(0)

    dllm_generation.load_model = held
    command, argv = sys.argv[1], sys.argv[2:]
    sys.exit(cli.grid_main(argv) if command == "grid" else cli.main(command, argv))
""")


def start_holder(*argv: str) -> subprocess.Popen:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path))
    proc = subprocess.Popen([sys.executable, "-c", HOLDER, *argv], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            stderr=subprocess.DEVNULL, text=True, env=env)
    for line in proc.stdout:  # a grid prints its cells first
        if line.strip() == "holding":
            return proc
    raise AssertionError(f"the holder ended before its model load (exit {proc.wait()})")


def stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.kill()
    proc.wait(timeout=60)


def refused_line(err: str) -> str:
    lines = [line for line in err.splitlines() if line.strip() and " INFO " not in line and " WARNING " not in line]
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


def no_model_loading(monkeypatch):
    import dllm_generation

    def refuse(*args, **kwargs):
        raise AssertionError("the model must not be loaded")

    monkeypatch.setattr(dllm_generation, "load_model", refuse)


def folder_files(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_a_second_run_on_a_folder_in_use_is_refused_naming_the_holder(tmp_path, capsys, monkeypatch):
    """Two configurations under one --run-name, at the same time: the second stops at once."""
    out = tmp_path / "out"
    common = [*ARITH, "--run-name", "shared", "--output-dir", str(out)]
    holder = start_holder("arith", *common, "--k", "1")
    try:
        before = folder_files(out / "arith" / "shared")
        no_model_loading(monkeypatch)
        capsys.readouterr()
        assert main("arith", [*common, "--k", "3", "--subset", "last"]) == 1
        line = refused_line(capsys.readouterr().err)
        assert line.startswith("error: ") and f"(pid {holder.pid})" in line and "shared" in line
        assert folder_files(out / "arith" / "shared") == before
    finally:
        stop(holder)


def test_a_second_grid_on_the_same_folders_stops_before_any_cell(tmp_path, capsys, monkeypatch):
    out = tmp_path / "out"
    argv = ["--task", "arith", "--k", "1,2", "--subset", "first", "--size", "1", *ARITH, "--output-dir", str(out)]
    holder = start_holder("grid", *argv)
    try:
        no_model_loading(monkeypatch)
        capsys.readouterr()
        assert grid_main(argv) == 1
        captured = capsys.readouterr()
        assert f"(pid {holder.pid})" in refused_line(captured.err)
        assert "[grid] finished" not in captured.out
        assert not list(out.rglob("*.jsonl")) and not list(out.rglob("run.json"))
    finally:
        stop(holder)


def test_a_killed_holder_leaves_no_stale_lock(tmp_path):
    from dllm_generation.eval.folder_lock import RunFolderBusyError, run_folder_lock

    out = tmp_path / "out"
    holder = start_holder("arith", *ARITH, "--run-name", "r", "--output-dir", str(out))
    holder.send_signal(signal.SIGKILL)
    holder.wait(timeout=60)
    assert (out / "arith" / "r" / ".lock").exists()  # the file stays, the kernel dropped the lock
    with run_folder_lock(str(out / "arith" / "r")):
        with pytest.raises(RunFolderBusyError, match=rf"\(pid {os.getpid()}\)"):
            with run_folder_lock(str(out / "arith" / "r")):
                pass
    assert not (out / "arith" / "r" / ".lock").exists()  # released: nothing left behind


@pytest.mark.parametrize("name", ["/tmp/elsewhere", "..", ".", "a/b", "../../x", "", ".hidden", "a\\b", "x" * 200])
def test_a_run_name_must_be_one_safe_folder_name(name, tmp_path, capsys, monkeypatch):
    no_model_loading(monkeypatch)
    out = tmp_path / "root" / "out"
    with pytest.raises(SystemExit) as stopped:
        main("arith", [*ARITH, "--output-dir", str(out), "--run-name", name])
    assert stopped.value.code == 2
    line = refused_line(capsys.readouterr().err)
    assert "run_name=" in line and "allowed:" in line
    assert not (tmp_path / "root").exists() and not Path("/tmp/elsewhere").exists()
