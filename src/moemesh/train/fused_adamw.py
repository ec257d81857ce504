"""AdamW over fp32 master weights in one pass per tensor (Triton), for bf16 training on a GPU.

With bf16 parameters and fp32 masters, the step used to take four passes over memory: cast the bf16
gradients to fp32 master gradients, torch's fused AdamW over the masters, and cast the masters back into
the bf16 parameters (plus a Python loop of per-parameter casts). This kernel reads the gradient in
whatever dtype it has (bf16 from the model, or fp32 master gradients once they were reduced across ranks),
the fp32 master and both moments, and writes the master, the moments and the bf16 parameter: 28 bytes per
parameter from bf16 gradients, against 40 before.

Numerics are torch's AdamW (`torch.optim.AdamW`, no amsgrad): decoupled weight decay
`p *= 1 - lr*wd`, moments `m = b1*m + (1-b1)*g`, `v = b2*v + (1-b2)*g*g`, then
`p -= lr / (1-b1^t) * m / (sqrt(v) / sqrt(1-b2^t) + eps)`; `g` is the gradient divided by `grad_scale`
(the clipping factor's inverse) when one is given. One difference: the kernel forms b^t as exp(t*log b) in
fp32 (the step count lives on the device), where torch uses pow in double: masters differ by ~1e-7
relative (tests: 1e-6 against torch.optim.AdamW). As torch's fused AdamW does, a nonzero `found_inf`
leaves the master, the moments and the step count as they are, so the host needn't wait for the check.
The optimizer state lives in a `torch.optim.AdamW` (same keys, `step` a float32 tensor on the device), so
checkpoints and the unfused path read and write the same state.
`step_reference` is the pure-PyTorch fallback with the same contract; tests compare the two.
"""

from __future__ import annotations

import functools

import torch

from moemesh.kernels import interpreting

BLOCK = 4096  # elements per program: 16 B/elem in flight per thread at 8 warps, enough to hide latency


@functools.cache
def _kernel(interpret: bool):  # one build per mode: triton.jit reads TRITON_INTERPRET when it decorates
    import triton
    import triton.language as tl

    @triton.jit
    def adamw_master(param_ptr, grad_ptr, master_ptr, exp_avg_ptr, exp_avg_sq_ptr, step_ptr, found_inf_ptr,
                     grad_scale_ptr, lr_ptr, numel, beta1, beta2, eps, weight_decay,
                     HAS_SCALE: tl.constexpr, BLOCK: tl.constexpr):
        if tl.load(found_inf_ptr) != 0:
            return
        offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        mask = offs < numel
        step = tl.load(step_ptr)
        lr = tl.load(lr_ptr)
        bias1 = 1.0 - tl.exp(step * tl.log(beta1))
        bias2_sqrt = tl.sqrt(1.0 - tl.exp(step * tl.log(beta2)))
        g = tl.load(grad_ptr + offs, mask=mask).to(tl.float32)
        if HAS_SCALE:
            g = g / tl.load(grad_scale_ptr)
        p = tl.load(master_ptr + offs, mask=mask)
        m = tl.load(exp_avg_ptr + offs, mask=mask)
        v = tl.load(exp_avg_sq_ptr + offs, mask=mask)
        p = p * (1.0 - lr * weight_decay)
        m = beta1 * m + (1.0 - beta1) * g
        v = beta2 * v + (1.0 - beta2) * g * g
        p = p - (lr / bias1) * m / (tl.sqrt(v) / bias2_sqrt + eps)
        tl.store(master_ptr + offs, p, mask=mask)
        tl.store(exp_avg_ptr + offs, m, mask=mask)
        tl.store(exp_avg_sq_ptr + offs, v, mask=mask)
        # fp32 -> bf16, rounding to nearest even by hand: Triton's interpreter truncates in `.to`, and
        # this way the CPU test checks the GPU's rounding too (masters are finite here: a non-finite step
        # was skipped above)
        bits = p.to(tl.uint32, bitcast=True)
        bits = (bits + 0x7FFF + ((bits >> 16) & 1)) >> 16
        tl.store(param_ptr + offs, bits.to(tl.uint16).to(tl.bfloat16, bitcast=True), mask=mask)

    return adamw_master


def _state(optimizer: torch.optim.Optimizer, master: torch.Tensor) -> dict[str, torch.Tensor]:
    state = optimizer.state[master]
    if not state:  # as torch's fused AdamW creates it, so either path (or a checkpoint) can continue it
        state["step"] = torch.zeros((), dtype=torch.float32, device=master.device)
        state["exp_avg"] = torch.zeros_like(master, memory_format=torch.preserve_format)
        state["exp_avg_sq"] = torch.zeros_like(master, memory_format=torch.preserve_format)
    return state


def _groups(optimizer: torch.optim.Optimizer, params: dict[torch.Tensor, torch.Tensor],
            grads: dict[torch.Tensor, torch.Tensor]):
    """(group, master, bf16 parameter, gradient, state) for every master that has a gradient."""
    for group in optimizer.param_groups:
        for master in group["params"]:
            grad = grads.get(master)
            if grad is not None:
                yield group, master, params[master], grad, _state(optimizer, master)


@torch.no_grad()
def step(optimizer: torch.optim.Optimizer, params: dict[torch.Tensor, torch.Tensor],
         grads: dict[torch.Tensor, torch.Tensor], found_inf: torch.Tensor, grad_scale: torch.Tensor | None,
         lr: torch.Tensor) -> None:
    """One AdamW step: `params` maps each master to the parameter the model computes with, `grads` each
    master to its gradient (either dtype). found_inf, grad_scale and lr (the learning rate of every group)
    are 0-dim float32 device tensors: nothing of the step is a host value, so a CUDA graph can hold it."""
    kernel = _kernel(interpreting())
    work = list(_groups(optimizer, params, grads))
    steps = [state["step"] for *_, state in work]
    if steps:
        # a skipped step leaves the count as it was; the list form: adding one 0-dim tensor syncs the host
        increment = 1.0 - found_inf
        torch._foreach_add_(steps, [increment] * len(steps))
    for group, master, param, grad, state in work:
        assert master.is_contiguous() and param.is_contiguous() and grad.is_contiguous()
        numel = master.numel()
        kernel[((numel + BLOCK - 1) // BLOCK,)](
            param, grad, master, state["exp_avg"], state["exp_avg_sq"], state["step"], found_inf,
            grad_scale if grad_scale is not None else found_inf, lr, numel, group["betas"][0],
            group["betas"][1], group["eps"], group["weight_decay"],
            HAS_SCALE=grad_scale is not None, BLOCK=BLOCK, num_warps=8)


@torch.no_grad()
def step_reference(optimizer: torch.optim.Optimizer, params: dict[torch.Tensor, torch.Tensor],
                   grads: dict[torch.Tensor, torch.Tensor], found_inf: torch.Tensor,
                   grad_scale: torch.Tensor | None, lr: torch.Tensor) -> None:
    """The same step in PyTorch operations (the fallback, and the reference the kernel is tested against)."""
    work = list(_groups(optimizer, params, grads))
    for *_, state in work:
        state["step"] += 1.0 - found_inf
    if bool(found_inf):
        return
    for group, master, param, grad, state in work:
        beta1, beta2 = group["betas"]
        t = state["step"]
        g = grad.float() / grad_scale if grad_scale is not None else grad.float()
        master.mul_(1 - lr * group["weight_decay"])
        state["exp_avg"].mul_(beta1).add_(g, alpha=1 - beta1)
        state["exp_avg_sq"].mul_(beta2).addcmul_(g, g, value=1 - beta2)
        denom = state["exp_avg_sq"].sqrt() / torch.sqrt(1 - beta2 ** t) + group["eps"]
        master.add_(-lr / (1 - beta1 ** t) * state["exp_avg"] / denom)
        param.copy_(master)

