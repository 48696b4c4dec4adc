"""Captured passes repeated on the GPU: a CUDA graph WHILE node around them.

When the decoder allows a step to repeat (`plan.Repeat`), the pass itself computes whether it
would be planned again (`rules.step_repeats`) into a one-element flag. A WHILE node runs the pass
again while that flag holds, so the steps of a sub-block follow each other on the device: no
device-to-host read, no planning and no launch between them. A step whose layer-reuse schedule
cycles through several passes (compute, recall, compute, ...) runs them in turn: the loop's body
is the first pass, then an IF node that runs the second only if the flag still holds, and so on.

torch (2.11) does not expose conditional graph nodes, so the loop is assembled with NVIDIA's
`cuda-bindings` (the `gpu` extra): an outer graph holds one WHILE node whose body holds each
captured pass as a child graph, each followed by one-thread kernels that copy the flag into the
conditions (`cudaGraphSetConditional`, compiled once per process with NVRTC). Whatever is missing
(the package, NVRTC, a driver before CUDA 12.4) becomes a reason that `loop_support` returns, and
the engine then repeats the step from the host.
"""

from __future__ import annotations

import functools
import os

import numpy as np
import torch

_KERNEL_NAME = "set_loop_condition"
_KERNEL = """
extern "C" __global__ void set_loop_condition(cudaGraphConditionalHandle handle, const bool* flag) {
    cudaGraphSetConditional(handle, *flag ? 1u : 0u);
}
"""
# NVRTC knows the device runtime's builtins once they are declared; the toolkit's header is the
# fallback where that declaration is refused.
_DECLARATION = """
typedef unsigned long long cudaGraphConditionalHandle;
extern "C" __device__ __attribute__((cudart_builtin)) void cudaGraphSetConditional(
    cudaGraphConditionalHandle handle, unsigned int value);
"""
_HEADER = "#include <cuda_device_runtime_api.h>\n"


def _check(result):
    """cuda-bindings calls return (status, *values): raise on a failed status, return the values."""
    status, *values = result
    if int(status) != 0:
        raise RuntimeError(getattr(status, "name", str(status)))
    if not values:
        return None
    return values[0] if len(values) == 1 else tuple(values)


def _toolkit_include_dirs() -> list[str]:
    roots = [os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), "/usr/local/cuda"]
    dirs = [os.path.join(root, "include") for root in roots if root]
    return [d for d in dirs if os.path.exists(os.path.join(d, "cuda_device_runtime_api.h"))]


def _compile(nvrtc, arch: str) -> bytes:
    """The condition kernel's cubin for `arch` (e.g. "sm_90")."""
    failures = []
    attempts = [(_DECLARATION + _KERNEL, [])]
    includes = _toolkit_include_dirs()
    if includes:
        attempts.append((_HEADER + _KERNEL, [f"-I{d}" for d in includes]))
    for source, extra in attempts:
        program = _check(nvrtc.nvrtcCreateProgram(source.encode(), b"device_loop.cu", 0, [], []))
        try:
            options = [f"--gpu-architecture={arch}".encode(), b"-default-device"] + [o.encode() for o in extra]
            status = nvrtc.nvrtcCompileProgram(program, len(options), options)[0]
            if int(status) == 0:
                size = _check(nvrtc.nvrtcGetCUBINSize(program))
                cubin = b" " * size
                _check(nvrtc.nvrtcGetCUBIN(program, cubin))
                return cubin
            size = _check(nvrtc.nvrtcGetProgramLogSize(program))
            log = b" " * size
            nvrtc.nvrtcGetProgramLog(program, log)
            failures.append(log.decode(errors="replace").strip("\x00 \n").splitlines()[0:2])
        finally:
            nvrtc.nvrtcDestroyProgram(program)
    raise RuntimeError(f"NVRTC could not compile the loop condition kernel: {failures}")


@functools.lru_cache(maxsize=None)
def _condition_kernel(device_index: int):
    """(module, function) of the condition kernel on a device; raises with the reason."""
    from cuda.bindings import driver, nvrtc

    major, minor = torch.cuda.get_device_capability(device_index)
    cubin = _compile(nvrtc, f"sm_{major}{minor}")
    with torch.cuda.device(device_index):
        torch.zeros(1, device=f"cuda:{device_index}")  # the driver calls need torch's context current
        module = _check(driver.cuModuleLoadData(cubin))
        function = _check(driver.cuModuleGetFunction(module, _KERNEL_NAME.encode()))
    return module, function


def _device_index(device: torch.device) -> int:
    """The CUDA device's index ("cuda" alone means the current device)."""
    return device.index if device.index is not None else torch.cuda.current_device()


def loop_support(device: torch.device) -> str | None:
    """None when device loops work on `device`; otherwise why not (logged by the engine)."""
    if device.type != "cuda" or not torch.cuda.is_available():
        return f"device loops need a CUDA device (got {device})"
    return _loop_support(_device_index(device))


@functools.lru_cache(maxsize=None)
def _loop_support(device_index: int) -> str | None:
    if not hasattr(torch.cuda.CUDAGraph, "raw_cuda_graph"):
        return f"torch {torch.__version__} cannot hand out a captured graph (CUDAGraph.raw_cuda_graph)"
    try:
        import cuda.bindings
        from cuda.bindings import runtime
    except ImportError as err:
        return f"cuda-bindings is not installed (pip install 'dllm-generation[gpu]'): {err}"
    if int(cuda.bindings.__version__.split(".")[0]) < 13:
        return f"cuda-bindings {cuda.bindings.__version__} is older than 13"
    try:
        version = _check(runtime.cudaDriverGetVersion())
        if version < 12040:
            return f"the CUDA driver ({version}) predates conditional graph nodes (12.4)"
        _condition_kernel(device_index)
    except Exception as err:  # an optimisation: the reason is logged and the host repeats the step
        return f"{type(err).__name__}: {str(err)[:300]}"
    return None


class DeviceLoop:
    """`graphs` (captured with keep_graph=True) run in turn, repeating, while `flag` [1] bool, which
    each of them writes, holds. `launch` runs the first at least once, on the current stream."""

    def __init__(self, graphs, flag: torch.Tensor):
        from cuda.bindings import driver, runtime

        self._runtime, self._driver = runtime, driver
        self._graphs = list(graphs)  # the passes' memory pool lives as long as they do
        self._flag = flag
        self._outer = self._exec = None
        self._arguments = []  # kernel-node argument buffers, alive as long as the graph
        _, self._function = _condition_kernel(_device_index(flag.device))
        try:
            self._outer = _check(runtime.cudaGraphCreate(0))
            # The loop's condition starts at 1 on every launch: the first run needs no flag.
            loop = self._handle(1)
            body = self._conditional(self._outer, None, loop, runtime.cudaGraphConditionalNodeType.cudaGraphCondTypeWhile)
            for i, graph in enumerate(self._graphs):  # each pass opens its body graph (the loop's, or an IF's)
                node = _check(runtime.cudaGraphAddChildGraphNode(
                    body, None, 0, runtime.cudaGraph_t(init_value=graph.raw_cuda_graph())))
                after = self._set_condition(body, node, loop)
                if i + 1 < len(self._graphs):  # the next pass runs only while the flag still holds
                    then = self._handle(0)
                    after = self._set_condition(body, after, then)
                    body = self._conditional(body, after, then, runtime.cudaGraphConditionalNodeType.cudaGraphCondTypeIf)
            self._exec = _check(runtime.cudaGraphInstantiate(self._outer, 0))
        except Exception:
            self.close(wait=False)
            raise

    def _handle(self, default: int):
        runtime = self._runtime
        return _check(runtime.cudaGraphConditionalHandleCreate(
            self._outer, default, getattr(runtime, "cudaGraphCondAssignDefault", 1)))

    def _conditional(self, graph, after, handle, kind):
        """Add a conditional node of `kind` to `graph` (after node `after`); return its body graph."""
        params = self._runtime.cudaGraphNodeParams()
        params.type = self._runtime.cudaGraphNodeType.cudaGraphNodeTypeConditional
        params.conditional.handle = handle
        params.conditional.type = kind
        params.conditional.size = 1
        deps = None if after is None else [self._runtime.cudaGraphNode_t(init_value=int(after))]
        _check(self._runtime.cudaGraphAddNode(graph, deps, None, 0 if after is None else 1, params))
        return params.conditional.phGraph_out[0]

    def _set_condition(self, graph, after, handle):
        """Add, after node `after`, the kernel that sets `handle` from the flag; return the node."""
        driver = self._driver
        arguments = [np.array([int(handle)], dtype=np.uint64), np.array([self._flag.data_ptr()], dtype=np.uint64)]
        pointers = np.array([a.ctypes.data for a in arguments], dtype=np.uint64)
        self._arguments.append((arguments, pointers))
        kernel = driver.CUDA_KERNEL_NODE_PARAMS()
        kernel.func = self._function
        kernel.gridDimX = kernel.gridDimY = kernel.gridDimZ = 1
        kernel.blockDimX = kernel.blockDimY = kernel.blockDimZ = 1
        kernel.sharedMemBytes = 0
        kernel.kernelParams = pointers.ctypes.data
        return _check(driver.cuGraphAddKernelNode(driver.CUgraph(int(graph)), [driver.CUgraphNode(int(after))], 1, kernel))

    def launch(self) -> None:
        stream = torch.cuda.current_stream(self._flag.device).cuda_stream
        _check(self._runtime.cudaGraphLaunch(self._exec, stream))

    def close(self, *, wait: bool = True) -> None:
        """Destroy the loop's graphs (after the device has finished any launch of them)."""
        if wait and self._exec is not None:
            torch.cuda.synchronize(self._flag.device)
        if self._exec is not None:
            self._runtime.cudaGraphExecDestroy(self._exec)
            self._exec = None
        if self._outer is not None:
            self._runtime.cudaGraphDestroy(self._outer)
            self._outer = None

    def __del__(self):
        try:
            self.close(wait=False)
        except Exception:  # interpreter shutdown: the driver may already be gone
            pass
