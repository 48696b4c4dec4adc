"""The files one run leaves in `artifacts/<task>/<config>/`, written so that no crash loses work.

- `summary.json`: written once at the end, atomically (temp file + `os.replace`).
- `samples.jsonl`: one line per finished prompt, appended per batch with one `write` + fsync, so
  an interrupted run keeps every finished batch; at most a torn last line is lost, and it is
  dropped (atomically) when the run resumes. In multi-process runs rank r > 0 appends to
  `samples.rank<r>.jsonl`; the main process merges them into `samples.jsonl` (atomically, in
  dataset order) at the end.
- `batches.jsonl`: the same scheme, one line of throughput counters per batch, so a resumed
  run's throughput still covers every prompt.
- `run.json`: the settings that decide the outputs, written once the run can start (its model is
  loaded); a resumed run with other settings is refused instead of mixing two configurations in
  one file. A folder without results never refuses anything.
- `.replaced/`: while a `--force` run replaces earlier results, they wait here until the new run
  has written its first result, and are then removed. A run that stops before that puts them
  back when the folder is next used, so a failed replacement loses nothing.
"""

from __future__ import annotations

import contextlib
import glob
import json
import logging
import os
import shutil
import signal
import tempfile
import threading

logger = logging.getLogger(__name__)

SUMMARY = "summary.json"
IDENTITY = "run.json"
SAMPLES = "samples.jsonl"
BATCHES = "batches.jsonl"
REPLACED = ".replaced"


def write_json_atomic(path: str, data) -> None:
    """Write JSON to `path` so that readers see the old file or the whole new one, never a part."""
    write_text_atomic(path, json.dumps(data, indent=2, sort_keys=False, default=_jsonable) + "\n")


def write_jsonl_atomic(path: str, records: list[dict]) -> None:
    write_text_atomic(path, "".join(_line(r) for r in records))


def append_jsonl(path: str, records: list[dict]) -> None:
    """Append whole lines in one write and flush them to disk before returning."""
    if not records:
        return
    with open(path, "a", encoding="utf-8") as f:
        f.write("".join(_line(r) for r in records))
        f.flush()
        os.fsync(f.fileno())


def read_jsonl(path: str) -> tuple[list[dict], int]:
    """Records of a JSON Lines file and the number of unreadable (torn) lines skipped."""
    if not os.path.exists(path):
        return [], 0
    records, bad = [], 0
    with open(path, encoding="utf-8") as f:
        for line in f:
            if not line.strip():
                continue
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError:
                bad += 1
    return records, bad


def read_json(path: str):
    with open(path, encoding="utf-8") as f:
        return json.load(f)


class RunFolderDamagedError(RuntimeError):
    """A file that tells what a run folder holds cannot be read."""


class RunFiles:
    """Paths of one run folder, and the per-process files this process appends to."""

    def __init__(self, run_dir: str, rank: int = 0):
        self.dir = run_dir
        self.rank = rank

    @property
    def summary(self) -> str:
        return os.path.join(self.dir, SUMMARY)

    def samples_path(self, rank: int | None = None) -> str:
        return self._ranked(SAMPLES, self.rank if rank is None else rank)

    def batches_path(self, rank: int | None = None) -> str:
        return self._ranked(BATCHES, self.rank if rank is None else rank)

    def _ranked(self, name: str, rank: int) -> str:
        if rank == 0:
            return os.path.join(self.dir, name)
        stem, ext = os.path.splitext(name)
        return os.path.join(self.dir, f"{stem}.rank{rank}{ext}")

    def _all(self, name: str) -> list[str]:
        stem, ext = os.path.splitext(name)
        paths = [os.path.join(self.dir, name)]
        paths += sorted(glob.glob(os.path.join(self.dir, f"{stem}.rank*{ext}")))
        return [p for p in paths if os.path.exists(p)]

    @property
    def identity(self) -> str:
        return os.path.join(self.dir, IDENTITY)

    def has_summary(self) -> bool:
        return os.path.exists(self.summary)

    def read_summary(self) -> dict | None:
        """The summary, or None when there is none or it cannot be read (logged): it is rebuilt from
        the samples and counters, which are what the folder keeps."""
        if not self.has_summary():
            return None
        try:
            summary = read_json(self.summary)
        except (OSError, ValueError) as err:
            logger.warning("%s is unreadable (%s): it will be rebuilt from the samples", self.summary, err)
            return None
        if not isinstance(summary, dict):
            logger.warning("%s holds no summary object: it will be rebuilt from the samples", self.summary)
            return None
        return summary

    def result_paths(self) -> list[str]:
        """The files that hold finished work (samples, counters, summary) of any process."""
        paths = [*self._all(SAMPLES), *self._all(BATCHES)]
        return paths + ([self.summary] if self.has_summary() else [])

    def has_results(self) -> bool:
        return bool(self.result_paths())

    @property
    def replaced_dir(self) -> str:
        return os.path.join(self.dir, REPLACED)

    def begin(self, identity: dict, *, replace: bool) -> None:
        """Main process, once the run can start: set earlier results aside (`replace`), write run.json.

        Set-aside files are removed by the first `append` (the new run's first result).
        """
        if replace and self.has_results():
            os.makedirs(self.replaced_dir)
            for path in [*self.result_paths(), self.identity]:
                if os.path.exists(path):
                    os.replace(path, os.path.join(self.replaced_dir, os.path.basename(path)))
            logger.info("--force: earlier results in %s set aside until this run writes its first result", self.dir)
        if replace or not self.has_results() or not os.path.exists(self.identity):
            write_json_atomic(self.identity, identity)

    def settle_replaced(self) -> None:
        """Finish a replacement the last run started: drop the old files if it wrote a result, else restore them."""
        if not os.path.isdir(self.replaced_dir):
            return
        if self.has_results():
            shutil.rmtree(self.replaced_dir)
            return
        for name in os.listdir(self.replaced_dir):
            os.replace(os.path.join(self.replaced_dir, name), os.path.join(self.dir, name))
        os.rmdir(self.replaced_dir)
        logger.warning("%s: a --force run stopped before its first result; earlier results restored", self.dir)

    def identity_conflicts(self, identity: dict) -> list[str]:
        """Settings that differ from those the results in this folder were made with (none without results)."""
        if not os.path.exists(self.identity) or not self.has_results():
            return []
        try:
            stored = read_json(self.identity)
        except (OSError, ValueError) as err:
            raise self._damaged_identity(err) from None
        if not isinstance(stored, dict):
            raise self._damaged_identity("not a JSON object")
        return [f"{k}: {stored.get(k)!r} (stored) != {identity.get(k)!r} (now)"
                for k in sorted(set(stored) | set(identity)) if stored.get(k) != identity.get(k)]

    def _damaged_identity(self, reason) -> RunFolderDamagedError:
        return RunFolderDamagedError(
            f"{self.identity} is unreadable ({reason}), so the settings of the results beside it are unknown; "
            "delete it to keep those results under the current settings, or pass --force to replace them")

    def repair(self) -> None:
        """Drop torn lines left by a crash, so appends start on a clean line, then the batches a crash
        left partial.

        A batch's counters (tokens, forwards, seconds) cover all its rows at once, so they count only
        while every row of the batch has its sample. A batch missing one (a torn sample line), and the
        samples of a batch whose counters were lost, are set back to unfinished: the rerun decodes those
        rows again as one batch, and no row is counted twice or without its work.
        """
        sample_files, batch_files = {}, {}
        for files, name in ((sample_files, SAMPLES), (batch_files, BATCHES)):
            for path in self._all(name):
                records, bad = read_jsonl(path)
                if files is sample_files:  # a sample without its row id cannot be matched to a row
                    kept = [r for r in records if isinstance(r, dict) and "id" in r and "index" in r]
                    bad, records = bad + len(records) - len(kept), kept
                if bad:
                    logger.warning("%s: dropping %d unreadable line(s) left by an interrupted run", path, bad)
                    write_jsonl_atomic(path, records)
                files[path] = records
        self._drop_partial_batches(sample_files, batch_files)

    def _drop_partial_batches(self, sample_files: dict[str, list[dict]], batch_files: dict[str, list[dict]]) -> None:
        if not any("ids" in b for records in batch_files.values() for b in records):
            return  # counters written before batches named their rows: nothing to match
        have = {r["id"] for records in sample_files.values() for r in records}
        partial = [b for records in batch_files.values() for b in records if "ids" in b and not have.issuperset(b["ids"])]
        counted = {i for records in batch_files.values() for b in records if "ids" in b and b not in partial
                   for i in b["ids"]}
        redo = (have - counted) | {i for b in partial for i in b["ids"]}
        if not redo:
            return
        logger.warning("%s: %d batch(es) an interrupted run left partial, and %d row(s) with a sample but no "
                       "counters, go back to unfinished (%d finished row(s) decoded again)",
                       self.dir, len(partial), len(have - counted), len(redo & have))
        for path, records in batch_files.items():  # counters first: a crash between the two rewrites
            kept = [b for b in records if b not in partial]  # leaves samples without counters, redone next time
            if len(kept) != len(records):
                write_jsonl_atomic(path, kept)
        for path, records in sample_files.items():
            kept = [r for r in records if r["id"] not in redo]
            if len(kept) != len(records):
                write_jsonl_atomic(path, kept)

    def finished_samples(self) -> list[dict]:
        """Every sample record any process has written, first occurrence of each id wins."""
        seen, out = set(), []
        for path in self._all(SAMPLES):
            for record in read_jsonl(path)[0]:
                if not isinstance(record, dict) or "id" not in record:
                    continue  # damaged: `repair` drops it, and the row is decoded again
                if record["id"] not in seen:
                    seen.add(record["id"])
                    out.append(record)
        return out

    def batch_records(self) -> list[dict]:
        return [r for path in self._all(BATCHES) for r in read_jsonl(path)[0]]

    def append(self, samples: list[dict], batch: dict) -> None:
        """Record one finished batch: its samples first (what resume trusts), then its counters.

        Ctrl-C is held back until both are on disk, so an interrupt never splits a batch's records.
        The first result of a `--force` run also removes the results it replaces.
        """
        os.makedirs(self.dir, exist_ok=True)
        with interrupts_deferred():
            append_jsonl(self.samples_path(), samples)
            append_jsonl(self.batches_path(), [batch])
        if os.path.isdir(self.replaced_dir):
            shutil.rmtree(self.replaced_dir)

    def consolidate(self, samples: list[dict], batches: list[dict]) -> None:
        """Main process: one `samples.jsonl` / `batches.jsonl` in final order; per-rank files removed."""
        write_jsonl_atomic(self.samples_path(0), samples)
        write_jsonl_atomic(self.batches_path(0), batches)
        for path in self._all(SAMPLES)[1:] + self._all(BATCHES)[1:]:
            os.remove(path)


@contextlib.contextmanager
def interrupts_deferred():
    """Hold SIGINT (Ctrl-C) until the block is done, then deliver it (main thread only)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    received = []
    previous = signal.signal(signal.SIGINT, lambda *args: received.append(args))
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)
        if received and callable(previous):
            previous(*received[0])


def write_text_atomic(path: str, text: str) -> None:
    """Write text via a temp file in the same folder + os.replace (readers never see half a file)."""
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix="." + os.path.basename(path) + ".", suffix=".tmp", dir=folder)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600; give the file normal permissions
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _line(record: dict) -> str:
    return json.dumps(record, ensure_ascii=False, default=_jsonable) + "\n"


def _jsonable(value):
    if hasattr(value, "tolist"):
        return value.tolist()
    if hasattr(value, "to_dict"):
        return value.to_dict()
    return str(value)
