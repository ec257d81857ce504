"""Rotary position embedding (the half-split convention of moemesh.model.layers.apply_rotary) on q or k
laid out [B, S, H, Dh], as one kernel each way.

Eager PyTorch applies it to the transposed [B, H, S, Dh] view: four products, two sums and a cat per
tensor, on strided memory, forward and backward (24 small kernels per layer). Here one kernel reads x and
writes the rotated copy; the backward is the same kernel rotating by -theta. The angle tables stay fp32
(eager rounds them to x's dtype first). Legend: B batch, S sequence, H heads, Dh head dim.
"""

from __future__ import annotations

import functools

import torch

from moemesh.kernels import cdiv, interpreting

ROWS = 16  # (b, s, h) rows per program


@functools.cache
def _kernel(interpret: bool):  # one build per mode: triton.jit reads TRITON_INTERPRET when it decorates
    import triton
    import triton.language as tl

    @triton.jit
    def rotary_rotate(x_ptr, cos_ptr, sin_ptr, y_ptr, num_rows, S, H, HALF, SIGN: tl.constexpr, ROWS: tl.constexpr,
                      BLOCK_H: tl.constexpr):
        rows = tl.program_id(0).to(tl.int64) * ROWS + tl.arange(0, ROWS)
        cols = tl.arange(0, BLOCK_H)
        mask = (rows < num_rows)[:, None] & (cols < HALF)[None, :]
        at = rows[:, None] * (2 * HALF) + cols[None, :]
        table = ((rows // H) % S)[:, None] * HALF + cols[None, :]
        x1 = tl.load(x_ptr + at, mask=mask, other=0.0).to(tl.float32)
        x2 = tl.load(x_ptr + at + HALF, mask=mask, other=0.0).to(tl.float32)
        cos = tl.load(cos_ptr + table, mask=mask, other=0.0)
        sin = SIGN * tl.load(sin_ptr + table, mask=mask, other=0.0)
        tl.store(y_ptr + at, (x1 * cos - x2 * sin).to(y_ptr.dtype.element_ty), mask=mask)
        tl.store(y_ptr + at + HALF, (x2 * cos + x1 * sin).to(y_ptr.dtype.element_ty), mask=mask)

    return rotary_rotate


def _launch(x_BSHD: torch.Tensor, cos_SD: torch.Tensor, sin_SD: torch.Tensor, sign: float) -> torch.Tensor:
    batch, seq, heads, head_dim = x_BSHD.shape
    half = head_dim // 2
    y_BSHD = torch.empty_like(x_BSHD)
    num_rows = batch * seq * heads
    if num_rows:
        _kernel(interpreting())[(cdiv(num_rows, ROWS),)](
            x_BSHD, cos_SD, sin_SD, y_BSHD, num_rows, seq, heads, half, SIGN=sign, ROWS=ROWS,
            BLOCK_H=1 << (half - 1).bit_length())
    return y_BSHD


class _Rotary(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x_BSHD, cos_SD, sin_SD):
        ctx.save_for_backward(cos_SD, sin_SD)
        return _launch(x_BSHD.contiguous(), cos_SD, sin_SD, 1.0)

    @staticmethod
    def backward(ctx, dy_BSHD):
        cos_SD, sin_SD = ctx.saved_tensors
        return _launch(dy_BSHD.contiguous(), cos_SD, sin_SD, -1.0), None, None


def rotary(x_BSHD: torch.Tensor, cos_SD: torch.Tensor, sin_SD: torch.Tensor) -> torch.Tensor:
    """x rotated by position s (the S axis, from 0), tables [>= S, Dh/2] fp32 contiguous; a new
    contiguous [B, S, H, Dh] tensor."""
    assert cos_SD.dtype == sin_SD.dtype == torch.float32 and cos_SD.is_contiguous() and sin_SD.is_contiguous()
    assert x_BSHD.shape[-1] % 2 == 0 and cos_SD.shape[0] >= x_BSHD.shape[1], (x_BSHD.shape, cos_SD.shape)
    assert cos_SD.shape[1] == sin_SD.shape[1] == x_BSHD.shape[-1] // 2, (x_BSHD.shape, cos_SD.shape)
    return _Rotary.apply(x_BSHD, cos_SD, sin_SD)
