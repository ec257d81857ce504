"""Gradient reduction in buckets, launched during the backward pass (parallel.overlap_grad_reduce).

The same reductions as `grads.sync_gradients`, read from the same placement table (`layout.py`), but
each bucket's all-reduce starts as soon as the last gradient of the bucket has been computed, so the
communication of the late layers runs while autograd still computes the early ones (PyTorch DDP,
Megatron-Core `overlap_grad_reduce`, torchtitan). `finish()` waits for all of them before clipping.

Which group a gradient is summed over (then every summed gradient is scaled by 1 / (dp * ep)):
  dense                      data x expert        (each coordinate back-propagated its own micro-batch)
  expert                     data                 (already a sum over its expert group's micro-batches)
  partial over model (SP)    the above x model    (summing over model first, then over data x expert, as
                                                   sync_gradients does, is one sum over the product group)
Axes of size 1 drop out; a gradient left with no group (an expert at dp=1) is only scaled.

Numerics: a bucket is fp32 (the dtype of the parameters the optimizer updates: the fp32 master weights
when the model computes in bf16). A bf16 gradient is widened into it in the backward hook and summed in
fp32, which is what `grads_to_masters` + `sync_gradients` do, so only the order of the sums across ranks
(the backend's, per bucket) differs. After `finish()` the optimizer's parameters (masters, if any) hold
the reduced fp32 gradients as views of the buckets, and the model's own `.grad` of a bucketed parameter
is None (the hook frees it once copied).

Every rank launches the buckets in the same fixed order (bucket k only after buckets < k, as DDP does):
collectives on one group must be issued in the same order on every rank.
"""

from __future__ import annotations

import functools
import weakref
from dataclasses import dataclass

import torch
from torch import nn

from moemesh.parallel.comm import Pending
from moemesh.parallel.grads import sync_gradients
from moemesh.parallel.layout import Layout, Placement

# The ranks each named group spans, as mesh axes (mesh.comm(name)).
GROUP_AXES = {"data": ("data",), "expert": ("expert",), "model": ("model",),
              "data_expert": ("data", "expert"), "world": ("data", "expert", "model")}


def reduction_group(placement: Placement, layout: Layout) -> str | None:
    """The group this parameter's gradient is summed over, or None when nothing needs summing."""
    base = ("data",) if placement.expert else ("data", "expert")
    axes = {axis for axis in (*base, *placement.partial_over) if layout.size(axis) > 1}
    if not axes:
        return None
    preferred = ("data" if placement.expert else "data_expert", *GROUP_AXES)  # then the narrowest
    for group in preferred:
        if axes == {axis for axis in GROUP_AXES[group] if layout.size(axis) > 1}:
            return group
    raise AssertionError(f"no process group spans the axes {sorted(axes)}")


@dataclass(frozen=True)
class Bucket:
    group: str
    names: tuple[str, ...]
    numels: tuple[int, ...]

    @property
    def numel(self) -> int:
        return sum(self.numels)


def plan_buckets(layout: Layout, names: list[str], numels: dict[str, int], bucket_bytes: int,
                 element_size: int = 4) -> tuple[list[Bucket], list[str]]:
    """Buckets of at most ~bucket_bytes per group (a parameter is never split), filled in reverse
    registration order (roughly the order backward produces gradients) and ordered by when their last
    member should arrive; and the names that need no collective (only the scale)."""
    open_: dict[str, list[str]] = {}
    closed: list[tuple[int, Bucket]] = []
    scale_only = []

    def close(group: str, position: int) -> None:
        members = open_.pop(group)
        closed.append((position, Bucket(group, tuple(members), tuple(numels[n] for n in members))))

    for position, name in enumerate(reversed(names)):
        group = reduction_group(layout.params[name], layout)
        if group is None:
            scale_only.append(name)
            continue
        open_.setdefault(group, []).append(name)
        if sum(numels[n] for n in open_[group]) * element_size >= bucket_bytes:
            close(group, position)
    for group in list(open_):
        close(group, len(names))
    return [bucket for _, bucket in sorted(closed, key=lambda item: item[0])], scale_only


class GradSync:
    """Trainer's gradient sync. `finish()` after `backward()` (and after `grads_to_masters`): with
    overlap, waits for the bucket all-reduces that the backward hooks launched; without, runs
    `sync_gradients`. Either way the optimizer's parameters then hold the global-batch gradient."""

    def __init__(self, model: nn.Module, params, layout: Layout, mesh, overlap: bool, bucket_mb: float):
        self.params, self.layout, self.mesh = params, layout, mesh
        self.overlap = overlap and mesh is not None and mesh.world_size > 1
        self.launched_in_backward = 0  # buckets of the last step launched before finish() (tests read it)
        self.hooks: list = []  # removable handles of the backward hooks (none without overlap)
        if not self.overlap:
            return
        named = {name: p for name, p in model.named_parameters() if p.requires_grad}
        self.targets = {name: p for name, p in params.named_parameters() if name in named}
        dtype = next(iter(self.targets.values())).dtype
        self.buckets, self.scale_only = plan_buckets(
            layout, list(named), {n: p.numel() for n, p in named.items()}, int(bucket_mb * 2**20),
            torch.tensor([], dtype=dtype).element_size())
        device = next(iter(named.values())).device
        self.flat = [torch.zeros(b.numel, dtype=dtype, device=device) for b in self.buckets]
        self.slots: dict[str, tuple[int, int, int]] = {}  # name -> (bucket, offset, numel)
        for index, bucket in enumerate(self.buckets):
            offset = 0
            for name, numel in zip(bucket.names, bucket.numels):
                self.slots[name] = (index, offset, numel)
                offset += numel
        self.scale = 1.0 / mesh.num_batch_shards
        self.model_params = named
        self._reset()
        # The hooks live in autograd's C++ state, which Python's garbage collector does not see: a hook that
        # held this object would keep it, the model and its buffers alive after the trainer is gone (a
        # second Trainer in one process then ran out of GPU memory). They hold a weak reference instead.
        self_ref = weakref.ref(self)
        self.hooks = [named[name].register_post_accumulate_grad_hook(functools.partial(_forward_arrival, self_ref, name))
                      for name in self.slots]

    def _reset(self) -> None:
        # A parameter frozen since (requires_grad=False) will send no gradient: its bucket does not wait for it.
        self.missing = [sum(self.model_params[n].requires_grad for n in b.names) for b in self.buckets]
        self.arrived: set[str] = set()
        self.pending: list[Pending] = []

    def _slot(self, name: str) -> torch.Tensor:
        index, offset, numel = self.slots[name]
        return self.flat[index][offset:offset + numel]

    def close(self) -> None:
        """Remove the backward hooks (the model may outlive this object)."""
        for handle in self.hooks:
            handle.remove()
        self.hooks = []

    @torch.no_grad()
    def _arrived(self, name: str, param: torch.Tensor) -> None:
        assert name not in self.arrived, f"{name}: a second gradient in one step"
        self._slot(name).copy_(param.grad.reshape(-1))  # widened to fp32 if the model computes in bf16
        param.grad = None
        self.arrived.add(name)
        self.missing[self.slots[name][0]] -= 1
        # Launch in bucket order only: every rank issues the same collectives in the same order.
        while len(self.pending) < len(self.buckets) and self.missing[len(self.pending)] == 0:
            self._launch(len(self.pending))

    def _launch(self, index: int) -> None:
        self.pending.append(self.mesh.comm(self.buckets[index].group).all_reduce_async_(self.flat[index]))

    @torch.no_grad()
    def finish(self) -> None:
        if not self.overlap:
            sync_gradients(self.params, self.layout, self.mesh)
            return
        self.launched_in_backward = len(self.pending)
        # Buckets holding a parameter without a gradient this step (frozen, unused) go now, in order.
        for name in self.slots.keys() - self.arrived:
            if self.model_params[name].grad is not None or self.targets[name].grad is not None:
                raise RuntimeError(f"{name} has a gradient that its backward hook never saw (was the parameter "
                                   f"replaced after the trainer was built?): it would not be reduced")
            self._slot(name).zero_()
        for index in range(len(self.pending), len(self.buckets)):
            self._launch(index)
        for index, pending in enumerate(self.pending):
            pending.wait()
            self.flat[index].mul_(self.scale)  # after the sum, as sync_gradients does
        for name in self.arrived:
            target = self.targets[name]
            target.grad = self._slot(name).view_as(target)
        scale_only = [self.targets[n].grad for n in self.scale_only if self.targets[n].grad is not None]
        if scale_only and self.scale != 1.0:
            torch._foreach_mul_(scale_only, self.scale)
        self._reset()


def _forward_arrival(sync_ref: "weakref.ref[GradSync]", name: str, param: torch.Tensor) -> None:
    sync = sync_ref()
    if sync is not None:
        sync._arrived(name, param)
