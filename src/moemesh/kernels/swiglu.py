"""silu(gate) * up, the SwiGLU experts' activation, as one kernel each way.

Eager PyTorch runs silu, then the product, and keeps silu(gate) for the product's backward: five passes
over R*F elements forward and backward more, plus one extra R*F tensor saved per MoE layer. Here the
forward reads gate and up and writes h; the backward reads gate, up and dh and writes both gradients,
recomputing the sigmoid. Legend: R rows, F hidden dim.
"""

from __future__ import annotations

import functools

import torch

from moemesh.kernels import cdiv, interpreting

BLOCK = 2048


@functools.cache
def _kernels(interpret: bool):  # one build per mode: triton.jit reads TRITON_INTERPRET when it decorates
    import triton
    import triton.language as tl

    @triton.jit
    def swiglu_forward(gate_ptr, up_ptr, h_ptr, numel, BLOCK: tl.constexpr):
        offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        mask = offs < numel
        g = tl.load(gate_ptr + offs, mask=mask).to(tl.float32)
        u = tl.load(up_ptr + offs, mask=mask).to(tl.float32)
        tl.store(h_ptr + offs, (g / (1.0 + tl.exp(-g)) * u).to(h_ptr.dtype.element_ty), mask=mask)

    @triton.jit
    def swiglu_backward(gate_ptr, up_ptr, dh_ptr, dgate_ptr, dup_ptr, numel, BLOCK: tl.constexpr):
        offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        mask = offs < numel
        g = tl.load(gate_ptr + offs, mask=mask).to(tl.float32)
        u = tl.load(up_ptr + offs, mask=mask).to(tl.float32)
        dh = tl.load(dh_ptr + offs, mask=mask).to(tl.float32)
        s = 1.0 / (1.0 + tl.exp(-g))  # tl.sigmoid is a jit function, which the interpreter cannot call
        tl.store(dup_ptr + offs, (dh * g * s).to(dup_ptr.dtype.element_ty), mask=mask)
        tl.store(dgate_ptr + offs, (dh * u * s * (1.0 + g * (1.0 - s))).to(dgate_ptr.dtype.element_ty), mask=mask)

    return swiglu_forward, swiglu_backward


def _grid(numel: int) -> tuple[int]:
    return (cdiv(numel, BLOCK),)


class _SwiGLU(torch.autograd.Function):
    @staticmethod
    def forward(ctx, gate_RF, up_RF):
        gate_RF, up_RF = gate_RF.contiguous(), up_RF.contiguous()
        h_RF = torch.empty_like(gate_RF)
        if gate_RF.numel():
            _kernels(interpreting())[0][_grid(gate_RF.numel())](gate_RF, up_RF, h_RF, gate_RF.numel(), BLOCK=BLOCK)
        ctx.save_for_backward(gate_RF, up_RF)
        return h_RF

    @staticmethod
    def backward(ctx, dh_RF):
        gate_RF, up_RF = ctx.saved_tensors
        dh_RF = dh_RF.contiguous()
        dgate_RF, dup_RF = torch.empty_like(gate_RF), torch.empty_like(up_RF)
        if gate_RF.numel():
            _kernels(interpreting())[1][_grid(gate_RF.numel())](gate_RF, up_RF, dh_RF, dgate_RF, dup_RF,
                                                                 gate_RF.numel(), BLOCK=BLOCK)
        return dgate_RF, dup_RF


def swiglu(gate_RF: torch.Tensor, up_RF: torch.Tensor) -> torch.Tensor:
    """silu(gate) * up; same shapes and dtype."""
    assert gate_RF.shape == up_RF.shape and gate_RF.dtype == up_RF.dtype, (gate_RF.shape, up_RF.shape)
    return _SwiGLU.apply(gate_RF, up_RF)
