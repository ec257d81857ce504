"""Collectives on one mesh axis, with autograd, and a trace of every collective a rank issues.

`AxisComm` wraps the process group of one axis (data, expert, model, data_expert). Every collective,
forward or backward, goes through `AxisComm._issue`, which
  1. notes where the rank is (step, layer, op, axis) so a watchdog can say where a hang waits;
  2. with `check_collectives`, first exchanges a fingerprint of the collective with every rank of the
     world (SPMD: all ranks issue the same sequence, each on its own group of that axis) and stops with
     a message naming the first diverging collective and the ranks on each side;
  3. runs the collective.
"""

from __future__ import annotations

import hashlib
import os
import threading
import time
from dataclasses import dataclass

import torch
import torch.distributed as dist

from moemesh.errors import report

# torch 2.13 renamed the tensor-in/tensor-out collectives; 2.11 (the GPU machine) has only the old names.
_all_gather_single = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
_reduce_scatter_single = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor


class CollectiveMismatch(RuntimeError):
    pass


@dataclass
class CollectiveTrace:
    """Per-rank record of collectives; `where` is set by the loop (step) and layer hooks (layer)."""

    check: bool = False
    timeout_s: float = 300.0
    device: torch.device = torch.device("cpu")  # where fingerprints live (CUDA under NCCL)
    step: int = 0
    layer: str = "-"
    count: int = 0
    waiting: tuple[float, str] | None = None

    def describe(self, op: str, axis: str, shape: tuple[int, ...], group_ranks: list[int]) -> str:
        return f"#{self.count} step {self.step} {self.layer}: {op} on {axis} group {group_ranks} shape {list(shape)}"

    def start_watchdog(self, rank: int) -> None:
        """A daemon thread that reports (and ends the process) when one collective waits too long."""

        def watch():
            while True:
                time.sleep(1.0)
                waiting = self.waiting
                if waiting is not None and time.monotonic() - waiting[0] > self.timeout_s:
                    report(f"error: rank {rank} waited {self.timeout_s:.0f} s in collective "
                           f"{waiting[1]}; the other ranks of that group never joined it")
                    os._exit(3)

        threading.Thread(target=watch, daemon=True, name="moemesh-collective-watchdog").start()


class AxisComm:
    def __init__(self, axis: str, group, trace: CollectiveTrace):
        self.axis, self.group, self.trace = axis, group, trace
        self.size = dist.get_world_size(group)
        self.rank = dist.get_rank(group)
        self.ranks = dist.get_process_group_ranks(group)

    def _issue(self, op: str, shape: tuple[int, ...], fn) -> None:
        trace = self.trace
        trace.count += 1
        what = trace.describe(op, self.axis, shape, self.ranks)
        try:
            if trace.check:  # watched too: a rank that stopped issuing collectives never joins this one
                trace.waiting = (time.monotonic(), f"(order check before) {what}")
                _compare_fingerprints(trace, op, self.axis, shape, what)
            trace.waiting = (time.monotonic(), what)
            fn()
        finally:  # a collective that raised is no longer waited on: the watchdog must not report it later
            trace.waiting = None

    # --- plain collectives (no autograd) ---
    def all_reduce(self, x: torch.Tensor, op: str = "sum") -> torch.Tensor:
        x = x.contiguous().clone()
        name = "all_reduce" if op == "sum" else f"all_reduce_{op}"
        reduce_op = {"sum": dist.ReduceOp.SUM, "max": dist.ReduceOp.MAX}[op]
        self._issue(name, tuple(x.shape), lambda: dist.all_reduce(x, op=reduce_op, group=self.group))
        return x

    def all_gather(self, x: torch.Tensor, dim: int) -> torch.Tensor:
        x0 = x.movedim(dim, 0).contiguous()
        out = x0.new_empty((x0.shape[0] * self.size, *x0.shape[1:]))
        self._issue("all_gather", tuple(x.shape), lambda: _all_gather_single(out, x0, group=self.group))
        return out.movedim(0, dim)

    def reduce_scatter(self, x: torch.Tensor, dim: int) -> torch.Tensor:
        x0 = x.movedim(dim, 0).contiguous()
        out = x0.new_empty((x0.shape[0] // self.size, *x0.shape[1:]))
        self._issue("reduce_scatter", tuple(x.shape), lambda: _reduce_scatter_single(out, x0, group=self.group))
        return out.movedim(0, dim)

    def all_to_all(self, x: torch.Tensor, out_splits: list[int], in_splits: list[int]) -> torch.Tensor:
        x = x.contiguous()
        out = x.new_empty((sum(out_splits), *x.shape[1:]))
        # Row counts vary by rank; the fingerprint keeps only the trailing dims.
        self._issue("all_to_all", tuple(x.shape[1:]), lambda: dist.all_to_all_single(
            out, x, output_split_sizes=out_splits, input_split_sizes=in_splits, group=self.group))
        return out

    def local_slice(self, x: torch.Tensor, dim: int) -> torch.Tensor:
        return x.chunk(self.size, dim=dim)[self.rank].contiguous()


def _compare_fingerprints(trace: CollectiveTrace, op: str, axis: str, shape: tuple[int, ...], what: str) -> None:
    digest = hashlib.blake2b(f"{op}|{axis}|{shape}".encode(), digest_size=7).digest()
    mine = torch.tensor([trace.count, int.from_bytes(digest, "little")], dtype=torch.int64, device=trace.device)
    world = dist.get_world_size()
    everyone = torch.empty(world * 2, dtype=torch.int64, device=trace.device)
    _all_gather_single(everyone, mine)  # on the default group, which has the world's backend
    rows = everyone.view(world, 2).tolist()
    if all(row == rows[0] for row in rows):
        return
    descriptions = [None] * world
    dist.all_gather_object(descriptions, what)
    sides: dict[str, list[int]] = {}
    for rank, text in enumerate(descriptions):
        sides.setdefault(text.split(": ", 1)[1], []).append(rank)
    detail = "; ".join(f"ranks {ranks} issue {text}" for text, ranks in sides.items())
    raise CollectiveMismatch(f"collective order differs at collective #{trace.count} "
                             f"(step {trace.step}, {trace.layer}): {detail}")


# --- autograd-aware wrappers (Megatron's f / g and the sequence-parallel pair) ---

class _AllReduce(torch.autograd.Function):
    """All-reduce (sum) in the forward pass, the backward pass, or both:
    forward only  = Megatron's g (sum partial outputs; the gradient is already whole);
    backward only = Megatron's f (enter a region that produces partial input gradients);
    both          = a global statistic that every rank's loss depends on."""

    @staticmethod
    def forward(ctx, x, comm, in_forward, in_backward):
        ctx.comm, ctx.in_backward = comm, in_backward
        return comm.all_reduce(x) if in_forward else x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        return (ctx.comm.all_reduce(grad) if ctx.in_backward else grad), None, None, None


class _GatherAlongDim(torch.autograd.Function):
    """Forward all-gather along `dim`. Backward: reduce-scatter when downstream grads are partial sums,
    or keep this rank's slice when they are replicated (identical on every rank)."""

    @staticmethod
    def forward(ctx, x, comm, dim, grad_is_partial):
        ctx.comm, ctx.dim, ctx.partial = comm, dim, grad_is_partial
        return comm.all_gather(x, dim)

    @staticmethod
    def backward(ctx, grad):
        if ctx.partial:
            return ctx.comm.reduce_scatter(grad, ctx.dim), None, None, None
        return ctx.comm.local_slice(grad, ctx.dim), None, None, None


class _ReduceScatterAlongDim(torch.autograd.Function):
    """Forward reduce-scatter along `dim` (sum partials, keep this rank's sequence slice); backward all-gather."""

    @staticmethod
    def forward(ctx, x, comm, dim):
        ctx.comm, ctx.dim = comm, dim
        return comm.reduce_scatter(x, dim)

    @staticmethod
    def backward(ctx, grad):
        return ctx.comm.all_gather(grad, ctx.dim), None, None


class _AllToAll(torch.autograd.Function):
    """Rows to other ranks with variable split sizes; backward sends gradients back the same way."""

    @staticmethod
    def forward(ctx, x, comm, out_splits, in_splits):
        ctx.comm, ctx.out_splits, ctx.in_splits = comm, out_splits, in_splits
        return comm.all_to_all(x, out_splits, in_splits)

    @staticmethod
    def backward(ctx, grad):
        return ctx.comm.all_to_all(grad, ctx.in_splits, ctx.out_splits), None, None, None


def copy_to_group(x, comm: AxisComm):
    return _AllReduce.apply(x, comm, False, True)


def reduce_from_group(x, comm: AxisComm):
    return _AllReduce.apply(x, comm, True, False)


def all_reduce_with_grad(x, comm: AxisComm):
    return _AllReduce.apply(x, comm, True, True)


def gather_along_dim(x, comm: AxisComm, dim: int, grad_is_partial: bool):
    return _GatherAlongDim.apply(x, comm, dim, grad_is_partial)


def reduce_scatter_along_dim(x, comm: AxisComm, dim: int):
    return _ReduceScatterAlongDim.apply(x, comm, dim)


def all_to_all(x, comm: AxisComm, out_splits: list[int], in_splits: list[int]):
    return _AllToAll.apply(x, comm, out_splits, in_splits)
