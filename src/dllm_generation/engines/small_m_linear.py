"""A matrix product for passes of a few tokens: one read of the weight, as fast as the card streams it.

At batch 1 a pass multiplies 8 or 32 tokens by every weight, so its time is the time to read the
weights. This kernel reads the MLP's gate and up projections as one fused [2 x intermediate, hidden]
weight, closer to the card's memory bandwidth than cuBLAS's two products (docs/benchmarks.md). For
o_proj and down_proj (fewer output blocks than the card has multiprocessors) and for q/k/v it did not
win, so those stay with cuBLAS.

Each program owns `BLOCK_N` output columns for every token and walks the whole reduction, with
float32 accumulation and no atomics, so the result is deterministic. It serves half precision on
Hopper GPUs (sm_90), where the tile below was chosen by measurement; elsewhere the engine keeps
cuBLAS and says why (`support_reason`).
"""

from __future__ import annotations

import torch

MAX_TOKENS = 32  # the token tile: passes of more tokens use cuBLAS
BLOCK_N, BLOCK_K, NUM_WARPS, NUM_STAGES = 64, 64, 4, 3

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU builds of torch come without triton
    triton = None

if triton is not None:

    @triton.jit
    def _small_m_linear_kernel(x_ptr, w_ptr, y_ptr, M, K, stride_x, stride_w, stride_y,
                               BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
        columns = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
        tokens = tl.arange(0, BLOCK_M)
        reduction = tl.arange(0, BLOCK_K)
        x_ptrs = x_ptr + tokens[:, None] * stride_x + reduction[None, :]
        w_ptrs = w_ptr + columns[:, None] * stride_w + reduction[None, :]
        present = tokens[:, None] < M
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for _ in range(0, K // BLOCK_K):
            x = tl.load(x_ptrs, mask=present, other=0.0)
            acc = tl.dot(x, tl.trans(tl.load(w_ptrs)), acc)
            x_ptrs += BLOCK_K
            w_ptrs += BLOCK_K
        tl.store(y_ptr + tokens[:, None] * stride_y + columns[None, :], acc.to(y_ptr.dtype.element_ty), mask=present)


def small_m_linear(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """`x` [M <= MAX_TOKENS, K] @ `weight` [N, K].T, as `F.linear` without a bias. The caller checks
    `support_reason` once and keeps M within the tile."""
    x = x.contiguous()
    y = x.new_empty(x.shape[0], weight.shape[0])
    _small_m_linear_kernel[(weight.shape[0] // BLOCK_N,)](
        x, weight, y, x.shape[0], weight.shape[1], x.stride(0), weight.stride(0), y.stride(0),
        BLOCK_M=MAX_TOKENS, BLOCK_N=BLOCK_N, BLOCK_K=BLOCK_K, num_warps=NUM_WARPS, num_stages=NUM_STAGES)
    return y


def support_reason(device: torch.device, dtype: torch.dtype, out_features: int, in_features: int) -> str | None:
    """None when the kernel serves products with a weight [out_features, in_features] of `dtype`
    on `device`; otherwise why not."""
    if device.type != "cuda":
        return f"device is {device.type}, not CUDA"
    if dtype not in (torch.bfloat16, torch.float16):
        return f"{dtype}: the kernel serves bf16/fp16 (float32 keeps cuBLAS's products)"
    if triton is None:
        return "triton is not installed"
    if torch.cuda.get_device_capability(device) != (9, 0):
        return "the kernel's tile was chosen on Hopper (sm_90); other GPUs keep cuBLAS"
    if out_features % BLOCK_N or in_features % BLOCK_K:
        return f"weight [{out_features}, {in_features}] is not a multiple of the tile ({BLOCK_N}, {BLOCK_K})"
    return None
