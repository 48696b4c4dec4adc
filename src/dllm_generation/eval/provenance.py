"""Where and with what a number was measured: device name, library versions, threads, machine
load, git commit, time.

Throughput is only comparable between runs on the same kind of device on a quiet machine, so the
load average is recorded before the run and after it, with the CPU count and torch's thread count.
"""

from __future__ import annotations

import datetime
import os
import platform
import subprocess
import sys


# A machine counts as busy when its 1-minute load average before the run, i.e. other work,
# exceeds half its CPUs: then the run shared the host with that work and its timing is not clean.
BUSY_LOAD_PER_CPU = 0.5


def machine_load() -> dict:
    """Load averages (1, 5, 15 min) and CPU count, now."""
    try:
        load = [round(x, 2) for x in os.getloadavg()]
    except (OSError, AttributeError):  # not available on every platform
        load = None
    return {"load_average": load, "cpu_count": os.cpu_count()}


def is_busy(load: dict | None) -> bool:
    """Whether `machine_load()` output says other work was using the host."""
    if not load or not load.get("load_average") or not load.get("cpu_count"):
        return False
    return load["load_average"][0] > BUSY_LOAD_PER_CPU * load["cpu_count"]


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
