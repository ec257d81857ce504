"""parallelize(model, mesh): applies tensor, expert and data parallelism to a single-device model.

1. The placement table (`layout.build_layout`) says how each parameter is split; every parameter is
   replaced by this rank's slice of it.
2. TP hooks sub-layer inputs/outputs and swaps in the vocab-parallel embedding and cross-entropy.
3. EP swaps in the all-to-all dispatcher; router statistics become global over data x expert.
DP needs nothing at apply time: `grads.sync_gradients` reads the table.
"""

from __future__ import annotations

import torch
from torch import nn

from moemesh.config import ParallelConfig
from moemesh.model.transformer import Transformer
from moemesh.parallel.comm import all_reduce_with_grad
from moemesh.parallel.expert import ExpertParallelDispatcher
from moemesh.parallel.layout import Layout, build_layout
from moemesh.parallel.mesh import Mesh
from moemesh.parallel.tensor import apply_tensor_parallel


def parallelize(model: Transformer, mesh: Mesh | None, cfg: ParallelConfig) -> tuple[Transformer, Layout]:
    """Shard `model` (built whole, identically on every rank) onto the mesh; return it and its table."""
    if mesh is None:
        return model, build_layout(model, 1, 1, 1, False)
    layout = build_layout(model, mesh.dp, mesh.ep, mesh.tp, cfg.sequence_parallel)
    _keep_local_slices(model, layout, mesh)
    tp_comm = mesh.comm("model") if mesh.tp > 1 else None
    ep_comm = mesh.comm("expert") if mesh.ep > 1 else None
    if tp_comm is not None:
        apply_tensor_parallel(model, tp_comm, cfg.sequence_parallel)
    for moe in model.moe_layers():
        moe.dispatcher = ExpertParallelDispatcher(ep_comm, tp_comm, cfg.ep_overlap_chunks)
        if mesh.num_batch_shards > 1:
            data_expert = mesh.comm("data_expert")
            moe.stats_reducer = lambda stats, comm=data_expert: all_reduce_with_grad(stats, comm)
    _label_layers(model, mesh)
    return model, layout


@torch.no_grad()
def _keep_local_slices(model: nn.Module, layout: Layout, mesh: Mesh) -> None:
    for name, param in list(model.named_parameters()):
        if layout.params[name].shards:
            module_name, _, attr = name.rpartition(".")
            local = layout.local_slice(name, param.detach(), mesh.coords).clone()
            setattr(model.get_submodule(module_name), attr, nn.Parameter(local, requires_grad=param.requires_grad))


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


def full_buffers(model: nn.Module) -> dict[str, torch.Tensor]:
    """Persistent buffers (the routers' expert bias): replicated on every rank."""
    persistent = {name for name, _ in model.named_buffers()} - _non_persistent(model)
    return {name: b for name, b in model.named_buffers() if name in persistent}


def _non_persistent(model: nn.Module) -> set[str]:
    return {f"{prefix}.{name}" if prefix else name for prefix, module in model.named_modules()
            for name in module._non_persistent_buffers_set}


@torch.no_grad()
def gather_full_state(model: nn.Module, layout: Layout, mesh: Mesh | None) -> dict[str, torch.Tensor]:
    """Full (unsharded) parameters and persistent buffers under their single-process names, on every rank."""
    state = {}
    for name, param in model.named_parameters():
        full = param.detach()
        if mesh is not None:
            for axis, dim in reversed(layout.params[name].shards):
                full = mesh.comm(axis).all_gather(full, dim)
        state[name] = full.clone()  # a copy even when unsharded: never an alias of the live parameter
    for name, buffer in full_buffers(model).items():
        state[name] = buffer.detach().clone()
    return state
