"""RMSNorm, x / sqrt(mean(x^2) + eps) * w, as one kernel each way.

Eager PyTorch runs about six kernels forward (upcast, square, mean, rsqrt, two products, downcast) and
more backward, each a pass over N*D. Here the forward reads x and writes y and the per-row 1/rms (fp32,
kept for backward); the backward reads x, dy and 1/rms and writes dx, plus per-program partial sums of
the weight gradient that one small torch sum finishes. Same order of operations as the eager module,
(x * rstd) * w in fp32. Legend: N rows (tokens), D dim.
"""

from __future__ import annotations

import functools

import torch

from moemesh.kernels import cdiv, interpreting, row_programs

MAX_BLOCK = 8192  # elements per program and step: rows of a wider D would need a loop over columns


@functools.cache
def _kernels(interpret: bool):  # one build per mode: triton.jit reads TRITON_INTERPRET when it decorates
    import triton
    import triton.language as tl

    @triton.jit
    def rmsnorm_forward(x_ptr, w_ptr, y_ptr, rstd_ptr, N, D, eps, ROWS: tl.constexpr, BLOCK_D: tl.constexpr):
        rows = tl.program_id(0).to(tl.int64) * ROWS + tl.arange(0, ROWS)
        cols = tl.arange(0, BLOCK_D)
        mask = (rows < N)[:, None] & (cols < D)[None, :]
        at = rows[:, None] * D + cols[None, :]
        x = tl.load(x_ptr + at, mask=mask, other=0.0).to(tl.float32)
        rstd = tl.rsqrt(tl.sum(x * x, axis=1) / D + eps)
        w = tl.load(w_ptr + cols, mask=cols < D, other=0.0).to(tl.float32)
        tl.store(y_ptr + at, ((x * rstd[:, None]) * w[None, :]).to(y_ptr.dtype.element_ty), mask=mask)
        tl.store(rstd_ptr + rows, rstd, mask=rows < N)

    @triton.jit
    def rmsnorm_backward(x_ptr, w_ptr, dy_ptr, rstd_ptr, dx_ptr, dw_part_ptr, N, D, PER_PROGRAM: tl.constexpr,
                         ROWS: tl.constexpr, BLOCK_D: tl.constexpr):
        pid = tl.program_id(0).to(tl.int64)
        cols = tl.arange(0, BLOCK_D)
        w = tl.load(w_ptr + cols, mask=cols < D, other=0.0).to(tl.float32)
        dw = tl.zeros([BLOCK_D], dtype=tl.float32)
        # constexpr loop bounds: the interpreter cannot loop over runtime values
        for first in range(0, PER_PROGRAM, ROWS):
            rows = pid * PER_PROGRAM + first + tl.arange(0, ROWS)
            mask = (rows < N)[:, None] & (cols < D)[None, :]
            at = rows[:, None] * D + cols[None, :]
            x = tl.load(x_ptr + at, mask=mask, other=0.0).to(tl.float32)
            dy = tl.load(dy_ptr + at, mask=mask, other=0.0).to(tl.float32)
            rstd = tl.load(rstd_ptr + rows, mask=rows < N, other=0.0)
            xhat = x * rstd[:, None]
            wdy = dy * w[None, :]
            c = tl.sum(xhat * wdy, axis=1) / D
            tl.store(dx_ptr + at, ((wdy - xhat * c[:, None]) * rstd[:, None]).to(dx_ptr.dtype.element_ty), mask=mask)
            dw += tl.sum(dy * xhat, axis=0)
        tl.store(dw_part_ptr + pid * D + cols, dw, mask=cols < D)

    return rmsnorm_forward, rmsnorm_backward


def _blocks(dim: int) -> tuple[int, int]:
    block_d = 1 << (dim - 1).bit_length()
    return max(1, 4096 // block_d), block_d


def _memory_order(x: torch.Tensor) -> list[int] | None:
    """The dims of x in memory order (last dim last), when x's rows lie densely in memory in that order:
    contiguous x, and also sequence parallelism's [B, S, D] view of an [S, B, D] buffer. None otherwise."""
    order = sorted(range(x.dim() - 1), key=lambda d: -x.stride(d)) + [x.dim() - 1]
    return order if x.permute(order).is_contiguous() else None


def _rows(t: torch.Tensor, order: list[int]) -> torch.Tensor:
    """t's rows as a 2D view, in memory order (t laid out like x: `order` makes it contiguous)."""
    return t.permute(order).view(-1, t.shape[-1])


class _RMSNorm(torch.autograd.Function):
    """Rows are independent, so the kernels work on them in memory order, whatever the dims' order; the
    output and the input gradient are laid out like x (empty_like keeps a dense tensor's strides)."""

    @staticmethod
    def forward(ctx, x, weight, eps):
        order = _memory_order(x)
        x_ND = _rows(x, order)
        num_rows, dim = x_ND.shape
        rows, block_d = _blocks(dim)
        y = torch.empty_like(x)
        rstd_N = torch.empty(num_rows, dtype=torch.float32, device=x.device)
        if num_rows:
            _kernels(interpreting())[0][(cdiv(num_rows, rows),)](x_ND, weight, _rows(y, order), rstd_N, num_rows,
                                                                 dim, eps, ROWS=rows, BLOCK_D=block_d)
        ctx.save_for_backward(x, weight, rstd_N)
        ctx.order = order
        return y

    @staticmethod
    def backward(ctx, dy):
        x, weight, rstd_N = ctx.saved_tensors
        order = ctx.order
        x_ND = _rows(x, order)
        num_rows, dim = x_ND.shape
        rows, block_d = _blocks(dim)
        # rows per program a power of two (one compiled kernel for many row counts), >= ROWS
        per_program = max(rows, 1 << (cdiv(num_rows, row_programs(x.device)) - 1).bit_length())
        programs = cdiv(num_rows, per_program)
        dx = torch.empty_like(x)
        dw_part = torch.zeros(programs, dim, dtype=torch.float32, device=x.device)
        if num_rows:
            dy_ND = dy.permute(order).contiguous().view(-1, dim)
            _kernels(interpreting())[1][(programs,)](x_ND, weight, dy_ND, rstd_N, _rows(dx, order), dw_part,
                                                     num_rows, dim, PER_PROGRAM=per_program, ROWS=rows,
                                                     BLOCK_D=block_d)
        return dx, dw_part.sum(dim=0).to(weight.dtype), None


def supported(x: torch.Tensor) -> bool:
    return x.shape[-1] <= MAX_BLOCK and _memory_order(x) is not None


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """RMSNorm over the last dim of x (any leading shape whose rows lie densely in memory, `supported`);
    the output in x's dtype and layout."""
    assert supported(x), (x.shape, x.stride())
    return _RMSNorm.apply(x, weight, eps)
