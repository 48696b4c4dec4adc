"""Which process am I, and how the rows are split, for `accelerate launch` runs.

`accelerate` is imported only when the launcher started several processes (it sets WORLD_SIZE),
so a plain `python eval_scripts/gsm8k.py` works on a machine without it.
"""

from __future__ import annotations

import datetime
import os
from dataclasses import dataclass

# Processes wait for each other only at the start and end of a run; one process may finish its
# share long before another, so the default collective timeout (minutes) is far too short.
BARRIER_TIMEOUT = datetime.timedelta(hours=int(os.environ.get("DLLM_EVAL_BARRIER_HOURS", "12")))


@dataclass
class ProcessContext:
    rank: int = 0
    world_size: int = 1
    device: str | None = None
    _state: object = None

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        if self._state is not None:
            self._state.wait_for_everyone()

    def split(self, items: list) -> list:
        """This process's contiguous share of `items` (all of them in a single process)."""
        if self._state is None:
            return list(items)
        with self._state.split_between_processes(list(items)) as mine:
            return list(mine)


def launched_world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def process_context() -> ProcessContext:
    if launched_world_size() <= 1:
        return ProcessContext()
    try:
        from accelerate import PartialState
    except ImportError as err:
        raise RuntimeError(
            f"WORLD_SIZE={launched_world_size()} means a multi-process launch, which needs `accelerate` ({err}); "
            "pip install accelerate, or run a single process"
        ) from None
    import torch

    # Without CUDA (or with `accelerate launch --cpu`-style env) the processes talk over gloo.
    cpu = os.environ.get("ACCELERATE_USE_CPU", "").lower() == "true" or not torch.cuda.is_available()
    state = PartialState(cpu=cpu, timeout=BARRIER_TIMEOUT)
    device = "cpu" if state.device is None or state.device.type == "cpu" else str(state.device)
    return ProcessContext(rank=state.process_index, world_size=state.num_processes, device=device, _state=state)


def shutdown() -> None:
    """Tear down the process group a multi-process launch opened (avoids NCCL's exit-time warning)."""
    if launched_world_size() <= 1:
        return
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
