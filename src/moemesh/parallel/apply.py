"""parallelize(model, mesh): applies tensor, expert and data parallelism to a single-device model.

Order: TP shards dense and expert weights inside each rank's slice of the hidden dims; EP keeps this
rank's experts and swaps in the all-to-all dispatcher; DP needs nothing at apply time besides the tags
that `grads.sync_gradients` and `clip_grad_norm` read. Every parameter records its shards in
`_mm_shards` [(axis, dim), ...] so `gather_full_state` can rebuild the full tensors.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from moemesh.config import ParallelConfig
from moemesh.model.transformer import Transformer
from moemesh.parallel.comm import all_reduce_with_grad
from moemesh.parallel.expert import ExpertParallelDispatcher
from moemesh.parallel.mesh import Mesh
from moemesh.parallel.tensor import apply_tensor_parallel, shard_param


def parallelize(model: Transformer, mesh: Mesh | None, cfg: ParallelConfig) -> Transformer:
    if mesh is None:
        return model
    tp_comm = mesh.comm("model") if mesh.tp > 1 else None
    ep_comm = mesh.comm("expert") if mesh.ep > 1 else None
    if tp_comm is not None:
        apply_tensor_parallel(model, tp_comm, cfg.sequence_parallel)
    for moe in model.moe_layers():
        for name in ("w1_EDF", "w3_EDF", "w2_EFD"):
            if ep_comm is not None:
                shard_param(moe.experts, name, ep_comm, 0, "expert")
            getattr(moe.experts, name)._mm_expert = True
        moe.dispatcher = ExpertParallelDispatcher(ep_comm, tp_comm)
        if mesh.num_batch_shards > 1:
            data_expert = mesh.comm("data_expert")
            moe.stats_reducer = lambda stats, comm=data_expert: all_reduce_with_grad(stats, comm)
    for param in model.parameters():
        sharded_over = math.prod(mesh.size(axis) for axis, _ in getattr(param, "_mm_shards", []))
        param._mm_replicas = mesh.world_size // sharded_over
    _label_layers(model, mesh)
    return model


def _label_layers(model: Transformer, mesh: Mesh) -> None:
    """Let the collective trace say which layer a collective belongs to."""
    def label(text):
        def hook(module, args):
            mesh.trace.layer = text
        return hook

    model.tok_embeddings.register_forward_pre_hook(label("embedding"))
    for index, block in enumerate(model.layers):
        block.register_forward_pre_hook(label(f"layer {index}"))
    model.output.register_forward_pre_hook(label("output"))


@torch.no_grad()
def gather_full_state(model: nn.Module, mesh: Mesh | None) -> dict[str, torch.Tensor]:
    """Full (unsharded) parameters and buffers under their single-process names, on every rank."""
    state = {}
    for name, param in model.named_parameters():
        full = param.detach()
        if mesh is not None:
            for axis, dim in reversed(getattr(param, "_mm_shards", [])):
                full = mesh.comm(axis).all_gather(full, dim)
        state[name] = full.clone()  # a copy even when unsharded: never an alias of the live parameter
    for name, buffer in model.named_buffers(remove_duplicate=True):
        if not name.startswith("rope_"):
            state[name] = buffer.detach().clone()
    return state
