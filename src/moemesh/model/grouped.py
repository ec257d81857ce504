"""Grouped GEMM over experts: rows of `x_RD` are grouped by expert (group e ends at `offsets_E[e]`).

One code path for all experts: `torch._grouped_mm` where it runs (row strides a multiple of 16 bytes;
bf16 on CUDA, fp32 on CPU), else an exact per-expert loop (fp32 on CUDA, odd sizes).

Legend: R routed rows, D model dim, F expert hidden dim, E experts.
"""

from __future__ import annotations

import torch


class _ContiguousGrad(torch.autograd.Function):
    """Identity whose backward makes the incoming gradient dense: `_grouped_mm`'s backward rejects
    stride-0 gradients such as the one `y.sum().backward()` produces."""

    @staticmethod
    def forward(ctx, x):
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        return grad.contiguous()


def grouped_mm_runs(dtype: torch.dtype, dims: tuple[int, ...], capability: tuple[int, int] | None) -> bool:
    """Whether `torch._grouped_mm` takes weights with these trailing dims: 16-byte row strides, bf16 on a
    CUDA device of compute capability >= 9.0 (`capability`), fp32 on the CPU (capability None)."""
    if not hasattr(torch, "_grouped_mm"):
        return False
    row_bytes_ok = all(n * torch.tensor([], dtype=dtype).element_size() % 16 == 0 for n in dims)
    if capability is not None:
        return row_bytes_ok and dtype == torch.bfloat16 and capability >= (9, 0)
    return row_bytes_ok and dtype == torch.float32


def grouped_mm_supported(x_RD: torch.Tensor, w_EDF: torch.Tensor) -> bool:
    capability = torch.cuda.get_device_capability(x_RD.device) if x_RD.is_cuda else None
    return grouped_mm_runs(x_RD.dtype, tuple(w_EDF.shape[1:]), capability)


def grouped_mm(x_RD: torch.Tensor, w_EDF: torch.Tensor, offsets_E: torch.Tensor) -> torch.Tensor:
    """y[rows of e] = x[rows of e] @ w[e]; `offsets_E` int32 cumulative row counts (last == R)."""
    if grouped_mm_supported(x_RD, w_EDF):
        return _ContiguousGrad.apply(torch._grouped_mm(x_RD, w_EDF, offs=offsets_E))
    return grouped_mm_loop(x_RD, w_EDF, offsets_E)


def grouped_mm_loop(x_RD: torch.Tensor, w_EDF: torch.Tensor, offsets_E: torch.Tensor) -> torch.Tensor:
    """Reference path: one matmul per expert (syncs to read the offsets)."""
    bounds = [0] + offsets_E.tolist()
    parts = [x_RD[bounds[e]:bounds[e + 1]] @ w_EDF[e] for e in range(w_EDF.shape[0])]
    return torch.cat(parts) if parts else x_RD.new_zeros(0, w_EDF.shape[-1])
