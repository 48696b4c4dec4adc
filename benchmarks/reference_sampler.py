"""The reference Fast-dLLM v2 sampler's throughput, measured in another process, read from JSON.

The reference sampler ships as the checkpoint's own remote code and needs transformers 4.53, so it
cannot run in the benchmark's process. Its tok/s per (batch, cache) come in a file, which
benchmarks/reference_sampler_timing.py writes (run in an environment of its own, on the same card):

    {"environment": {"gpu": "...", "transformers": "4.53.1", ...},      # free-form, copied into the results
     "runs": [{"batch": 1, "cache": "on", "tokens_per_second": 32.0},
              {"batch": 32, "cache": "off", "tokens_per_second": 774.1, "workload": "target"}]}

`batch` > 0, `cache` "on"/"off" (the block cache), `tokens_per_second` > 0; optional `workload`
("random"/"target") restricts a run to the rows of that workload, otherwise it applies to every
workload. Other keys of a run are kept as they are.
"""

from __future__ import annotations

import json

CACHE_VALUES = {"on": True, "off": False}


class ReferenceFileError(ValueError):
    """A reference file that cannot be used; the message names the file and the field."""


def load_reference(path: str, workloads: list[str]) -> dict:
    """Read and validate the file (before any model is built); `workloads`: the allowed `workload` values."""
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except OSError as err:
        raise ReferenceFileError(f"--reference-json {path}: cannot read it ({err.strerror})") from None
    except json.JSONDecodeError as err:
        raise ReferenceFileError(f"--reference-json {path}: not JSON ({err.msg} at line {err.lineno})") from None
    if not isinstance(data, dict) or not isinstance(data.get("runs"), list) or not data["runs"]:
        raise ReferenceFileError(f"--reference-json {path}: needs an object with a non-empty list 'runs'")
    if not isinstance(data.get("environment", {}), dict):
        raise ReferenceFileError(f"--reference-json {path}: 'environment' must be an object")
    for i, run in enumerate(data["runs"]):
        where = f"--reference-json {path}: runs[{i}]"
        if not isinstance(run, dict):
            raise ReferenceFileError(f"{where} must be an object")
        batch, cache, tps = run.get("batch"), run.get("cache"), run.get("tokens_per_second")
        if isinstance(batch, bool) or not isinstance(batch, int) or batch <= 0:
            raise ReferenceFileError(f"{where}.batch must be a positive integer, got {batch!r}")
        if cache not in CACHE_VALUES:
            raise ReferenceFileError(f"{where}.cache must be one of {list(CACHE_VALUES)}, got {cache!r}")
        if isinstance(tps, bool) or not isinstance(tps, (int, float)) or not tps > 0:
            raise ReferenceFileError(f"{where}.tokens_per_second must be a positive number, got {tps!r}")
        if run.get("workload") is not None and run["workload"] not in workloads:
            raise ReferenceFileError(f"{where}.workload must be one of {workloads} or absent, got {run['workload']!r}")
    return {"path": path, "environment": data.get("environment", {}), "runs": data["runs"]}


def reference_tokens_per_second(reference: dict | None, batch: int, cache: bool, workload: str) -> float | None:
    """The reference's tok/s for this row, preferring a run of the same workload over a generic one."""
    if reference is None:
        return None
    matches = [r for r in reference["runs"] if r["batch"] == batch and CACHE_VALUES[r["cache"]] == cache
               and r.get("workload") in (None, workload)]
    matches.sort(key=lambda r: r.get("workload") is None)
    return float(matches[0]["tokens_per_second"]) if matches else None
