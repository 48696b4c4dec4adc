"""The CUDA graphs of the graphed engine's passes, and the device loops built around them.

A pass shape (`PassKey`) is captured after its first, uncaptured run and replayed from then on;
beyond `MAX_GRAPHS` the least recently replayed one is dropped, with any device loop that holds
it. A pass that may repeat keeps its graph (`keep_graph=True`) so that a device loop
(`device_loop.py`) can hold it in its body; a loop is keyed by the passes it runs in turn.
Capturing and looping are optimisations: a failure frees what was taken, is logged once with its
reason, and passes then run uncaptured (or repeat from the host).
"""

from __future__ import annotations

import logging
import time
from collections import OrderedDict
from typing import Callable, Hashable

import torch

from .device_loop import DeviceLoop, loop_support

logger = logging.getLogger(__name__)

MAX_GRAPHS = 512  # captured passes kept per model; the least recently replayed one is dropped beyond


class CapturedPasses:
    """Graphs and device loops by pass key, with the counters `describe()` reports."""

    def __init__(self):
        self.graphs: "OrderedDict[Hashable, torch.cuda.CUDAGraph]" = OrderedDict()
        self.loops: dict[tuple[Hashable, ...], DeviceLoop] = {}
        self.pool = None
        self.captures = 0
        self.capture_seconds = 0.0
        self.replays = 0
        self.evictions = 0
        self.loop_launches = 0
        self.graph_failure: str | None = None
        self.loop_failure: str | None = None

    def replay(self, key) -> bool:
        """Replay the key's graph; False if there is none."""
        graph = self.graphs.get(key)
        if graph is None:
            return False
        graph.replay()
        self.graphs.move_to_end(key)
        self.replays += 1
        return True

    def capture(self, key, run: Callable[[], None], *, keep: bool, optional: bool = False) -> str | None:
        """Capture `run` (which has just run uncaptured) as the key's graph; `keep`: the graph may
        become a device loop's body. Returns why it was not captured, or None. Running out of
        memory frees every graph and ends capturing, and so does any other failure, unless
        `optional`: then the caller stops asking for that kind of graph and the others go on."""
        if self.graph_failure is not None:
            return self.graph_failure
        while len(self.graphs) >= MAX_GRAPHS:
            dropped, _ = self.graphs.popitem(last=False)
            for keys in [keys for keys in self.loops if dropped in keys]:
                self.loops.pop(keys).close()
            self.evictions += 1
        t0 = time.perf_counter()
        try:
            if self.pool is None:
                self.pool = torch.cuda.graph_pool_handle()
            keep = keep and self.loop_failure is None
            graph = torch.cuda.CUDAGraph(keep_graph=True) if keep else torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=self.pool):
                run()
        except torch.OutOfMemoryError as err:
            # Give back everything captured so far, then keep decoding uncaptured.
            self.graph_failure = f"out of memory while capturing: {str(err)[:300]}"
            self.drop(wait=False)
            torch.cuda.synchronize()
            torch.cuda.empty_cache()
            logger.warning("graphed engine: %s; graphs freed, continuing without them", self.graph_failure)
            return self.graph_failure
        except Exception as err:  # capture is an optimisation: keep decoding uncaptured
            failure = f"{type(err).__name__}: {err}"
            torch.cuda.synchronize()
            if optional:
                return failure
            self.graph_failure = failure
            logger.warning("graphed engine: CUDA graph capture failed, continuing without graphs: %s", failure)
            return failure
        self.graphs[key] = graph
        self.captures += 1
        self.capture_seconds += time.perf_counter() - t0
        return None

    def launch_loop(self, keys: tuple) -> bool:
        """Run the device loop through the passes `keys`; False if there is none."""
        loop = self.loops.get(keys)
        if loop is None:
            return False
        loop.launch()
        self.loop_launches += 1
        for key in keys:
            self.graphs.move_to_end(key)
        return True

    def add_loop(self, keys: tuple, flag: torch.Tensor, device: torch.device) -> None:
        """Build a device loop that runs the captured passes `keys` in turn while `flag` holds
        (nothing until every one of them is captured)."""
        graphs = [self.graphs.get(key) for key in keys]
        if None in graphs or self.loop_failure is not None:
            return
        reason = loop_support(device)
        if reason is None:
            try:
                self.loops[keys] = DeviceLoop(graphs, flag)
                return
            except Exception as err:  # an optimisation: repeat from the host instead
                reason = f"{type(err).__name__}: {str(err)[:300]}"
        self.loop_failure = reason
        logger.warning("graphed engine: device loops unavailable, repeating steps from the host: %s", reason)

    def drop(self, *, wait: bool = True) -> None:
        """Free every graph, its device loop and the graphs' memory pool."""
        for loop in self.loops.values():
            loop.close(wait=wait)
        self.loops.clear()
        self.graphs.clear()
        self.pool = None
