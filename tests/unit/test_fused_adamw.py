"""The one-pass AdamW over fp32 masters: the Triton kernel (run by Triton's interpreter on the CPU) against
its PyTorch fallback and against torch.optim.AdamW, over several steps with clipping and a skipped step."""

from __future__ import annotations

import pytest
import torch

from moemesh import kernels
from moemesh.train import fused_adamw

triton = pytest.importorskip("triton")

SHAPES = [(37, 29), (5000,), (3, 4096 + 7), (1,)]  # odd sizes: partial blocks; one tensor > one block


def _setup(seed: int, grad_dtype: torch.dtype):
    gen = torch.Generator().manual_seed(seed)
    masters = [torch.randn(s, generator=gen) for s in SHAPES]
    params = [m.to(torch.bfloat16) for m in masters]
    groups = [{"params": masters[:3], "weight_decay": 0.1}, {"params": masters[3:], "weight_decay": 0.0}]
    opt = torch.optim.AdamW(groups, lr=3e-3, betas=(0.9, 0.95), eps=1e-8, foreach=True)
    return masters, params, opt, gen


def _run(impl, seed: int, grad_dtype: torch.dtype, monkeypatch=None):
    masters, params, opt, gen = _setup(seed, grad_dtype)
    by_master = dict(zip(masters, params))
    for i in range(4):
        grads = {m: (torch.randn(m.shape, generator=gen) * 10 ** i).to(grad_dtype) for m in masters}
        found_inf = torch.tensor(1.0 if i == 2 else 0.0)  # step 3 is skipped
        scale = torch.tensor(1.7) if i % 2 else None
        impl(opt, by_master, grads, found_inf, scale, torch.tensor(opt.param_groups[0]["lr"]))
        for group in opt.param_groups:
            group["lr"] *= 0.7
    return masters, params, opt


def _torch_adamw(seed: int, grad_dtype: torch.dtype):
    """torch.optim.AdamW on the masters, with clipping applied to the gradient and the skipped step left out."""
    masters, params, opt, gen = _setup(seed, grad_dtype)
    for i in range(4):
        grads = [(torch.randn(m.shape, generator=gen) * 10 ** i).to(grad_dtype) for m in masters]
        if i != 2:
            for m, g in zip(masters, grads):
                m.grad = g.float() / 1.7 if i % 2 else g.float()
            opt.step()
        for group in opt.param_groups:
            group["lr"] *= 0.7
    return masters, opt


@pytest.mark.parametrize("grad_dtype", [torch.bfloat16, torch.float32])
def test_kernel_equals_fallback_equals_torch_adamw(monkeypatch, grad_dtype):
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert kernels.available(torch.device("cpu"))
    kernel_m, kernel_p, kernel_opt = _run(fused_adamw.step, 0, grad_dtype)
    ref_m, ref_p, ref_opt = _run(fused_adamw.step_reference, 0, grad_dtype)
    torch_m, torch_opt = _torch_adamw(0, grad_dtype)
    for a, b, c, pa, pb, start in zip(kernel_m, ref_m, torch_m, kernel_p, ref_p, _setup(0, grad_dtype)[0]):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)  # same formula, fp32 rounding order differs
        torch.testing.assert_close(a, c, rtol=1e-6, atol=1e-7)
        assert not torch.equal(a, start)  # it moved
        assert torch.equal(pa, a.to(torch.bfloat16))  # the bf16 parameter is its master, rounded
        assert torch.equal(pb, b.to(torch.bfloat16))
    for m_k, m_t in zip(kernel_m, torch_m):
        sk, st = kernel_opt.state[m_k], torch_opt.state[m_t]
        assert float(sk["step"]) == float(st["step"]) == 3.0  # the skipped step was not counted
        torch.testing.assert_close(sk["exp_avg"], st["exp_avg"], rtol=1e-5, atol=1e-7)  # torch: lerp_; here b1*m + (1-b1)*g
        torch.testing.assert_close(sk["exp_avg_sq"], st["exp_avg_sq"], rtol=1e-5, atol=1e-9)


def test_skipped_step_leaves_everything(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    masters, params, opt, gen = _setup(1, torch.bfloat16)
    before, params_before = [m.clone() for m in masters], [p.clone() for p in params]
    grads = {m: torch.full_like(m, float("nan")) for m in masters}
    fused_adamw.step(opt, dict(zip(masters, params)), grads, torch.tensor(1.0), None, torch.tensor(3e-3))
    assert all(torch.equal(a, b) for a, b in zip(masters, before))
    assert all(torch.equal(a, b) for a, b in zip(params, params_before))
    assert all(float(opt.state[m]["step"]) == 0 for m in masters)
    assert all(not opt.state[m]["exp_avg"].any() for m in masters)
