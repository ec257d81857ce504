"""Gradient synchronisation, global-norm clipping and metric averaging across the mesh, as the
placement table (`layout.py`) says:
  - a gradient that is partial over `model` (sequence-parallel norms) is summed over model;
  - each data x expert coordinate back-propagates the mean loss of its own micro-batch, so dense
    gradients are averaged over data x expert;
  - an expert's gradient already sums the contributions of every micro-batch of its expert group (tokens
    came to it by all-to-all), so it is summed over `data` and divided by dp*ep.
Both then equal the gradient of the global-batch mean loss.
"""

from __future__ import annotations

import torch
from torch import nn
from torch._utils import _flatten_dense_tensors, _unflatten_dense_tensors

from moemesh.parallel.comm import AxisComm
from moemesh.parallel.layout import Layout
from moemesh.parallel.mesh import Mesh


def _all_reduce_coalesced(grads: list[torch.Tensor], comm: AxisComm, scale: float) -> None:
    if not grads:
        return
    flat = comm.all_reduce(_flatten_dense_tensors(grads))
    if scale != 1.0:
        flat.mul_(scale)
    for grad, synced in zip(grads, _unflatten_dense_tensors(flat, grads)):
        grad.copy_(synced)


def sync_gradients(model: nn.Module, layout: Layout, mesh: Mesh | None) -> None:
    if mesh is None:
        return
    named = [(name, p.grad) for name, p in model.named_parameters() if p.grad is not None]
    placements = layout.params
    partial = [g for name, g in named if "model" in placements[name].partial_over]
    if partial:
        _all_reduce_coalesced(partial, mesh.comm("model"), 1.0)
    shards = mesh.dp * mesh.ep
    dense = [g for name, g in named if not placements[name].expert]
    expert = [g for name, g in named if placements[name].expert]
    if shards > 1:
        _all_reduce_coalesced(dense, mesh.comm("data_expert"), 1.0 / shards)
    if mesh.dp > 1:
        _all_reduce_coalesced(expert, mesh.comm("data"), 1.0 / shards)
    elif mesh.ep > 1:
        torch._foreach_mul_(expert, 1.0 / shards)


def clip_grad_norm(model: nn.Module, layout: Layout, max_norm: float, mesh: Mesh | None,
                   scale_grads: bool = True) -> torch.Tensor:
    """Scale gradients so the global L2 norm (each distinct element counted once) is at most max_norm;
    return the norm before clipping. One scalar all-reduce over the world. With scale_grads=False the
    caller applies `clip_factor(norm, max_norm)` itself (fused AdamW does it inside its kernel).
    `model` is anything with `named_parameters()` (a model, or its fp32 master weights); bf16 gradients
    are summed in fp32."""
    by_replicas: dict[int, list[torch.Tensor]] = {}
    for name, p in model.named_parameters():
        if p.grad is not None:
            by_replicas.setdefault(layout.replicas(name), []).append(p.grad)
    # One fused norm kernel per replica count (at most 3 groups) instead of one per parameter.
    sumsq = sum(torch.stack(torch._foreach_norm(group, 2, dtype=torch.float32)).pow(2).sum() / replicas
                for replicas, group in by_replicas.items())
    if mesh is not None:
        sumsq = mesh.comm("world").all_reduce(sumsq)
    norm = sumsq.sqrt()
    if max_norm > 0 and scale_grads:
        scale = clip_factor(norm, max_norm)
        for group in by_replicas.values():
            torch._foreach_mul_(group, scale)
    return norm


def clip_factor(norm: torch.Tensor, max_norm: float) -> torch.Tensor:
    return (max_norm / (norm + 1e-6)).clamp(max=1.0)


def mean_over_batch(values: torch.Tensor, mesh: Mesh | None) -> torch.Tensor:
    """Average per-micro-batch values (losses) over data x expert: the global-batch value."""
    if mesh is None or mesh.num_batch_shards == 1:
        return values
    return mesh.comm("data_expert").all_reduce(values) / mesh.num_batch_shards
