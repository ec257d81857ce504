"""The MoE dispatch's row movements when every assignment is kept (moemesh.model.moe, stages 2 and 4):

  gather_sum    out[t] = sum over k of w[t, k] * src[index[t*K + k]], fp32 accumulation, one kernel: the
                combine's forward (src = expert outputs, w = router weights) and the token gather's
                backward (src = row gradients, no weights). Eager PyTorch writes the K*T*D gathered
                slots, then sums them, and the combine multiplies by the weights in a pass before that.
  combine_backward  for every row r of assignment a = order[r] and token t = a // K: the row's gradient
                w[a] * g[t] and the weight's gradient dot(g[t], y[r]), in one pass over the rows (eager:
                a gather of g, a cast, a product, another product and a row sum).
Legend: T tokens, D dim, K top-k, R rows (= T*K here), A assignments (token * K + choice).
"""

from __future__ import annotations

import functools

import torch

from moemesh.kernels import cdiv, interpreting

BLOCK_T, BLOCK_D = 8, 512
BLOCK_R, BLOCK_RD = 16, 256


@functools.cache
def _kernels(interpret: bool):  # one build per mode: triton.jit reads TRITON_INTERPRET when it decorates
    import triton
    import triton.language as tl

    @triton.jit
    def gather_sum(src_ptr, index_ptr, w_ptr, out_ptr, T, D, K: tl.constexpr, HAS_W: tl.constexpr,
                   BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr):
        tokens = tl.program_id(0).to(tl.int64) * BLOCK_T + tl.arange(0, BLOCK_T)
        cols = tl.program_id(1).to(tl.int64) * BLOCK_D + tl.arange(0, BLOCK_D)
        token_ok = tokens < T
        mask = token_ok[:, None] & (cols < D)[None, :]
        acc = tl.zeros([BLOCK_T, BLOCK_D], dtype=tl.float32)
        for k in tl.static_range(K):
            rows = tl.load(index_ptr + tokens * K + k, mask=token_ok, other=0)
            v = tl.load(src_ptr + rows[:, None] * D + cols[None, :], mask=mask, other=0.0).to(tl.float32)
            if HAS_W:
                v = v * tl.load(w_ptr + tokens * K + k, mask=token_ok, other=0.0).to(tl.float32)[:, None]
            acc += v
        tl.store(out_ptr + tokens[:, None] * D + cols[None, :], acc.to(out_ptr.dtype.element_ty), mask=mask)

    @triton.jit
    def combine_backward(g_ptr, y_ptr, w_ptr, order_ptr, dy_ptr, dw_ptr, R, D: tl.constexpr, K: tl.constexpr,
                         BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr):
        rows = tl.program_id(0).to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R)
        row_ok = rows < R
        assignment = tl.load(order_ptr + rows, mask=row_ok, other=0)
        tokens = assignment // K
        w = tl.load(w_ptr + assignment, mask=row_ok, other=0.0).to(tl.float32)
        dot = tl.zeros([BLOCK_R], dtype=tl.float32)
        for first in range(0, D, BLOCK_D):  # D constexpr: the interpreter cannot loop over runtime values
            cols = first + tl.arange(0, BLOCK_D)
            mask = row_ok[:, None] & (cols < D)[None, :]
            g = tl.load(g_ptr + tokens[:, None] * D + cols[None, :], mask=mask, other=0.0).to(tl.float32)
            y = tl.load(y_ptr + rows[:, None] * D + cols[None, :], mask=mask, other=0.0).to(tl.float32)
            tl.store(dy_ptr + rows[:, None] * D + cols[None, :], (g * w[:, None]).to(dy_ptr.dtype.element_ty),
                     mask=mask)
            dot += tl.sum(g * y, axis=1)
        tl.store(dw_ptr + assignment, dot, mask=row_ok)

    return gather_sum, combine_backward


def gather_sum(src_RD: torch.Tensor, index_A: torch.Tensor, top_k: int, weights_A: torch.Tensor | None,
               out_dtype: torch.dtype) -> torch.Tensor:
    """out[t] = sum_k weights_A[t*K + k] * src_RD[index_A[t*K + k]] (weights 1 when None), [T, D].
    int64 indices: the kernel's row offsets (index * D) are computed in the index dtype."""
    assert index_A.dtype == torch.int64, index_A.dtype
    src_RD = src_RD.contiguous()
    num_tokens, dim = index_A.numel() // top_k, src_RD.shape[-1]
    out_TD = torch.empty(num_tokens, dim, dtype=out_dtype, device=src_RD.device)
    if num_tokens and dim:
        _kernels(interpreting())[0][(cdiv(num_tokens, BLOCK_T), cdiv(dim, BLOCK_D))](
            src_RD, index_A, weights_A if weights_A is not None else src_RD, out_TD, num_tokens, dim, K=top_k,
            HAS_W=weights_A is not None, BLOCK_T=BLOCK_T, BLOCK_D=BLOCK_D)
    return out_TD


class _Combine(torch.autograd.Function):
    """fp32 out[t] = sum_k w[t, k] * y[inverse[t*K + k]]; order is the inverse permutation of inverse."""

    @staticmethod
    def forward(ctx, y_RD, weights_TK, order_R, inverse_A):
        y_RD = y_RD.contiguous()
        weights_A = weights_TK.reshape(-1).contiguous()
        ctx.save_for_backward(y_RD, weights_A, order_R)
        ctx.top_k, ctx.weights_shape = weights_TK.shape[1], weights_TK.shape
        return gather_sum(y_RD, inverse_A, ctx.top_k, weights_A, torch.float32)

    @staticmethod
    def backward(ctx, g_TD):
        y_RD, weights_A, order_R = ctx.saved_tensors
        g_TD = g_TD.contiguous()
        num_rows, dim = y_RD.shape
        dy_RD = torch.empty_like(y_RD)
        dw_A = torch.empty(weights_A.shape, dtype=torch.float32, device=y_RD.device)
        if num_rows and dim:
            _kernels(interpreting())[1][(cdiv(num_rows, BLOCK_R),)](
                g_TD, y_RD, weights_A, order_R, dy_RD, dw_A, num_rows, D=dim, K=ctx.top_k,
                BLOCK_R=BLOCK_R, BLOCK_D=BLOCK_RD)
        return dy_RD, dw_A.to(weights_A.dtype).view(ctx.weights_shape), None, None


def combine(y_RD: torch.Tensor, weights_TK: torch.Tensor, order_R: torch.Tensor, inverse_A: torch.Tensor) -> torch.Tensor:
    """The weighted sum over each token's K rows, fp32 [T, D]; `order_R` (row -> assignment) and
    `inverse_A` (assignment -> row) are inverse permutations of the T*K assignments."""
    assert order_R.numel() == inverse_A.numel() == weights_TK.numel() == y_RD.shape[0], (order_R.shape, y_RD.shape)
    assert order_R.dtype == inverse_A.dtype == torch.int64, (order_R.dtype, inverse_A.dtype)
    return _Combine.apply(y_RD, weights_TK, order_R, inverse_A)
