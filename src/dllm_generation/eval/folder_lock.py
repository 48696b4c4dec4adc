"""One process per run folder: an OS lock held for the run's whole life.

Two processes appending to one folder would mix their samples and counters (and two settings in
one `run.json`), so a run takes an exclusive, non-blocking `flock` on `<run>/.lock` before it
reads or changes anything there. The kernel drops the lock when its process ends, however it
ends, so a killed run never leaves a stale lock; a second process stops at once with one line
naming the holder's pid (which the holder writes into the lock file).

The file is removed when the lock is released (and the folders the run created, if it wrote nothing
there: a refused run leaves no trace). A process that opened it just before that checks,
once it holds the lock, that the path still names the file it locked, and starts over otherwise,
so two processes can never hold locks on two different files of one folder.
"""

from __future__ import annotations

import contextlib
import os

try:
    import fcntl
except ImportError:  # pragma: no cover - not a POSIX system
    fcntl = None

LOCK = ".lock"


class RunFolderBusyError(RuntimeError):
    """Another live process is using this run folder."""


@contextlib.contextmanager
def run_folder_lock(folder: str):
    """Hold `<folder>/.lock` (created with the folder) for the block, or raise RunFolderBusyError."""
    if fcntl is None:  # pragma: no cover - no flock: nothing to hold
        yield
        return
    created = _missing(folder)
    path = os.path.join(folder, LOCK)
    fd = _acquire(path, folder)
    try:
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        yield
    finally:
        with contextlib.suppress(OSError):
            os.remove(path)
        os.close(fd)  # closing releases the lock
        for made in created:  # a run refused before its first write leaves no folder behind
            try:
                os.rmdir(made)
            except OSError:
                break  # not empty: it holds results (or another run's folder)


def _acquire(path: str, folder: str) -> int:
    while True:
        os.makedirs(folder, exist_ok=True)
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
        except FileNotFoundError:  # a holder that created the folder removed it as it finished
            continue
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _holder(fd)
            os.close(fd)
            raise RunFolderBusyError(
                f"{folder} is in use by another run (pid {holder}); wait for it to finish or stop it, "
                "or pick another --output-dir / --run-name"
            ) from None
        except BaseException:
            os.close(fd)
            raise
        try:
            same = os.fstat(fd).st_ino == os.stat(path).st_ino
        except FileNotFoundError:
            same = False
        if same:
            return fd
        os.close(fd)  # the holder removed the file between our open and our lock: take the new one


def _missing(folder: str) -> list[str]:
    """`folder` and those of its parents that do not exist yet, deepest first."""
    out, path = [], os.path.abspath(folder)
    while not os.path.exists(path):
        out.append(path)
        path = os.path.dirname(path)
    return out


def _holder(fd: int) -> str:
    """The pid the holder wrote, or "unknown" in the instant before it writes it."""
    try:
        text = os.pread(fd, 32, 0).decode(errors="replace").strip()
    except OSError:
        text = ""
    return text if text.isdigit() else "unknown"
