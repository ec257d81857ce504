"""The Triton kernels (moemesh.kernels), run by Triton's interpreter on the CPU, against the model's
PyTorch code: values and gradients, odd sizes (partial blocks), fp32 (tight) and bf16 (a bf16 rounding).

Run by tests/unit/test_kernels.py in a process started with TRITON_INTERPRET=1: Triton's library
functions (tl.sum, tl.zeros) are jit functions that the interpreter can only run when triton was first
imported in interpreter mode."""

from __future__ import annotations

import os

import pytest
import torch
import torch.nn.functional as F

from moemesh.kernels import gather_sum, rmsnorm, rotary, swiglu
from moemesh.model.layers import RMSNorm, apply_rotary, rotary_tables
from moemesh.model.moe import RowOrder, combine, gather_tokens, permute

pytest.importorskip("triton")
assert os.environ.get("TRITON_INTERPRET") == "1", "run through tests/unit/test_kernels.py"

TOL = {torch.float32: dict(rtol=1e-5, atol=1e-5), torch.bfloat16: dict(rtol=2e-2, atol=2e-2)}


def _leaves(*tensors):
    return [t.detach().clone().requires_grad_(True) for t in tensors]


def _check(fn_kernel, fn_ref, inputs, dtype, seed=0):
    """Same values and same gradients (for a random upstream gradient) from both functions."""
    a, b = _leaves(*inputs), _leaves(*inputs)
    out_a, out_b = fn_kernel(*a), fn_ref(*b)
    torch.testing.assert_close(out_a.float(), out_b.float(), **TOL[dtype])
    grad = torch.randn(out_a.shape, generator=torch.Generator().manual_seed(seed)).to(out_a.dtype)
    out_a.backward(grad)
    out_b.backward(grad.to(out_b.dtype))
    for x, y in zip(a, b):
        torch.testing.assert_close(x.grad.float(), y.grad.float(), **TOL[dtype])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_swiglu(dtype):
    gen = torch.Generator().manual_seed(1)
    gate, up = (torch.randn(37, 50, generator=gen).to(dtype) for _ in range(2))  # 1850: a partial block
    _check(swiglu.swiglu, lambda g, u: F.silu(g) * u, [gate, up], dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("dim", [48, 96])
def test_rms_norm(dtype, dim):
    gen = torch.Generator().manual_seed(2)
    x = torch.randn(3, 11, dim, generator=gen).to(dtype)
    norm = RMSNorm(dim, 1e-5)
    weight = (1 + 0.1 * torch.randn(dim, generator=gen)).to(dtype)
    _check(lambda x, w: rmsnorm.rms_norm(x, w, 1e-5),
           lambda x, w: torch.func.functional_call(norm, {"weight": w}, (x,)), [x, weight], dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rotary(dtype):
    gen = torch.Generator().manual_seed(3)
    cos, sin = rotary_tables(12, 32, 10000.0)
    x_BSHD = torch.randn(2, 9, 3, 12, generator=gen).to(dtype)  # half 6: a masked block of 8

    def reference(x):
        return apply_rotary(x.transpose(1, 2), cos, sin).transpose(1, 2)

    _check(lambda x: rotary.rotary(x, cos, sin), reference, [x_BSHD], dtype)


def _routing(num_tokens, top_k, num_experts, seed):
    gen = torch.Generator().manual_seed(seed)
    experts_TK = torch.stack([torch.randperm(num_experts, generator=gen)[:top_k] for _ in range(num_tokens)]
                             or [torch.zeros(0, top_k, dtype=torch.int64)]).view(num_tokens, top_k)
    weights_TK = torch.rand(num_tokens, top_k, generator=gen)
    perm = permute(experts_TK, num_experts, None)
    return RowOrder.of(perm.order_R, num_tokens, top_k), weights_TK


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_combine(dtype):
    rows, weights_TK = _routing(num_tokens=21, top_k=3, num_experts=5, seed=4)
    y_RD = torch.randn(63, 40, generator=torch.Generator().manual_seed(5)).to(dtype)
    _check(lambda y, w: gather_sum.combine(y, w, rows.order_R, rows.inverse_A),
           lambda y, w: combine(y, rows, w), [y_RD, weights_TK], dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_gather_tokens_backward(dtype):
    rows, _ = _routing(num_tokens=19, top_k=2, num_experts=4, seed=6)
    x_TD = torch.randn(19, 600, generator=torch.Generator().manual_seed(7)).to(dtype)  # 600: two column blocks
    _check(lambda x: gather_tokens(x, rows, fused=True), lambda x: gather_tokens(x, rows), [x_TD], dtype)


def test_rms_norm_in_the_sequence_parallel_layout_and_over_many_programs():
    """Sequence parallelism hands the norms [B, S, D] views of [S, B, D] buffers: the kernel runs on them
    (rows in memory order), output and gradient laid out like the input. 1000 rows: each backward program
    loops over several row blocks and the weight gradient sums across programs."""
    gen = torch.Generator().manual_seed(12)
    norm = RMSNorm(64, 1e-5)
    weight = 1 + 0.1 * torch.randn(64, generator=gen)
    x_SP = torch.randn(40, 25, 64, generator=gen).movedim(0, 1)  # [B=25, S=40, D] over an [S, B, D] buffer
    assert not x_SP.is_contiguous() and rmsnorm.supported(x_SP)
    _check(lambda x, w: rmsnorm.rms_norm(x, w, 1e-5),
           lambda x, w: torch.func.functional_call(norm, {"weight": w}, (x,)), [x_SP, weight], torch.float32)
    out = rmsnorm.rms_norm(x_SP, weight, 1e-5)
    assert out.stride() == x_SP.stride()


def test_empty_inputs():
    """A rank with no rows (expert parallelism) or no tokens: empty outputs and gradients, no launch."""
    gate = torch.zeros(0, 8, requires_grad=True)
    up = torch.zeros(0, 8, requires_grad=True)
    swiglu.swiglu(gate, up).sum().backward()
    assert gate.grad.shape == (0, 8) and up.grad.shape == (0, 8)
    x = torch.zeros(0, 16, requires_grad=True)
    rmsnorm.rms_norm(x, torch.ones(16), 1e-5).sum().backward()
    assert x.grad.shape == (0, 16)
    rows, weights_TK = _routing(num_tokens=0, top_k=2, num_experts=4, seed=13)
    y_RD = torch.zeros(0, 8, requires_grad=True)
    w = weights_TK.requires_grad_(True)
    gather_sum.combine(y_RD, w, rows.order_R, rows.inverse_A).sum().backward()
    assert y_RD.grad.shape == (0, 8) and w.grad.shape == (0, 2)


def test_transformer_with_fused_kernels_matches_pytorch():
    """The whole model, every kernel switched on from outside (train.fused_kernels' applicator): the same
    loss and the same gradient for every parameter as the PyTorch code, fp32. The config has a dense
    block, shared experts and GQA, so every switched module runs."""
    from moemesh.config import load_config
    from moemesh.model.transformer import Transformer
    from moemesh.train.fused_kernels import apply_fused_kernels

    cfg = load_config("tiny", ["model.num_dense_layers=1", "model.num_shared_experts=1", "model.n_layers=2"]).model
    gen = torch.Generator().manual_seed(10)
    tokens = torch.randint(0, cfg.vocab_size, (2, 16), generator=gen)
    targets = torch.randint(0, cfg.vocab_size, (2, 16), generator=gen)
    results = []
    for fused in (False, True):
        torch.manual_seed(0)
        model = Transformer(cfg)
        apply_fused_kernels(model, fused)
        out = model(tokens, targets)
        out.loss.backward()
        results.append((out.loss.detach(), {n: p.grad for n, p in model.named_parameters()}))
    (loss_ref, grads_ref), (loss, grads) = results
    torch.testing.assert_close(loss, loss_ref, rtol=1e-6, atol=1e-6)
    assert grads.keys() == grads_ref.keys()
    for name in grads:
        torch.testing.assert_close(grads[name], grads_ref[name], rtol=1e-4, atol=1e-6, msg=name)
