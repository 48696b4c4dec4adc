"""Where and with what a number was measured: device name, library versions, threads, machine
load, git commit, time.

Throughput is only comparable between runs on the same kind of device on a quiet machine, so the
CPU time other processes use just before the run is measured, and the load average is recorded before
the run and after it, with the CPU count and torch's thread count.
"""

from __future__ import annotations

import datetime
import os
import platform
import subprocess
import sys
import time


# A machine counts as busy when other processes use more than half its CPUs just before the run:
# then the run shares the host with that work and its timing is not clean.
BUSY_LOAD_PER_CPU = 0.5
# How long other processes' CPU use is sampled before a run.
SAMPLE_SECONDS = 0.5


def other_cpu_use(seconds: float = SAMPLE_SECONDS) -> float | None:
    """CPUs' worth of time that processes other than this one (and its children) used over the next
    `seconds`; None where psutil is missing. The load average cannot tell other work from this
    process's own (a grid's previous configuration keeps the 1-minute load high for a minute)."""
    try:
        import psutil
    except ImportError:
        return None
    me = psutil.Process()

    def busy_total() -> float:
        t = psutil.cpu_times()
        return sum(getattr(t, name, 0.0) for name in ("user", "nice", "system", "irq", "softirq", "steal"))

    def own() -> float:
        t = me.cpu_times()
        return t.user + t.system + t.children_user + t.children_system

    start, own_start, clock = busy_total(), own(), time.monotonic()
    time.sleep(seconds)
    elapsed = time.monotonic() - clock
    others = (busy_total() - start) - (own() - own_start)
    return round(max(0.0, others) / elapsed, 2)


def machine_load(*, sample: bool = False) -> dict:
    """Load averages (1, 5, 15 min) and CPU count, now; with `sample`, also other processes' CPU use."""
    try:
        load = [round(x, 2) for x in os.getloadavg()]
    except (OSError, AttributeError):  # not available on every platform
        load = None
    out = {"load_average": load, "cpu_count": os.cpu_count()}
    if sample:
        out["other_cpu_use"] = other_cpu_use()
    return out


def is_busy(load: dict | None) -> bool:
    """Whether `machine_load()` output says other work was using the host: other processes' measured
    CPU use where it was sampled, else the 1-minute load average."""
    if not load or not load.get("cpu_count"):
        return False
    limit = BUSY_LOAD_PER_CPU * load["cpu_count"]
    if load.get("other_cpu_use") is not None:
        return load["other_cpu_use"] > limit
    return bool(load.get("load_average")) and load["load_average"][0] > limit


def environment(device, *, load_before: dict | None = None) -> dict:
    import torch
    import transformers

    after = machine_load()
    return {
        "device": str(device),
        "device_name": device_name(device),
        "cpu": cpu_name(),
        "cpu_count": after["cpu_count"],
        "torch_threads": torch.get_num_threads(),
        "load_average_before": (load_before or {}).get("load_average"),
        "load_average_after": after["load_average"],
        "other_cpu_use_before": (load_before or {}).get("other_cpu_use"),
        "busy": is_busy(load_before),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "python": platform.python_version(),
        "cuda": torch.version.cuda,
        "git_commit": git_commit(),
        "timestamp": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "command": " ".join(sys.argv),
    }


def device_name(device) -> str:
    import torch

    device = torch.device(device)
    if device.type == "cuda" and torch.cuda.is_available():
        return torch.cuda.get_device_name(device)
    return cpu_name()


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def git_commit() -> str | None:
    """HEAD of the repository holding this package (with '-dirty' if tracked files changed)."""
    here = os.path.dirname(os.path.abspath(__file__))
    try:
        head = subprocess.run(
            ["git", "-C", here, "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10, check=True
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "-C", here, "status", "--porcelain", "--untracked-files=no"],
            capture_output=True, text=True, timeout=10,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return head + ("-dirty" if dirty else "")
