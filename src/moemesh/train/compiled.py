"""`train.compile`: torch.compile of each block's dense parts (the two RMSNorms and attention, and a
dense block's MLP), applied from outside the model like activation checkpointing.

These are chains of small memory-bound operations in eager mode (the norm's fp32 upcast, square, mean,
rsqrt and scale; rotary embedding on strided views of q and k), which Inductor fuses into a few kernels.
The MoE layer stays eager (its grouped GEMMs are already single kernels), except the experts'
silu(gate) * up, compiled with a dynamic row count (it changes every step under expert parallelism) into
one kernel each way. `nn.Module.compile()` compiles in place, so parameter names, the placement table
and checkpoints are unchanged. Tensor parallelism's hooks would be traced into the graph, so compile needs tp=1.
The compiled modules run their PyTorch code (Inductor fuses it), not train.fused_kernels' Triton kernels,
which stay on for the MoE dispatch.
"""

from __future__ import annotations

import torch
from torch import nn

from moemesh.model.layers import SwiGLU, silu_mul
from moemesh.model.moe import MoE
from moemesh.model.transformer import Transformer
from moemesh.train.fused_kernels import set_kernels

BACKEND = "inductor"  # tests use "aot_eager": the same tracing and autograd, without code generation


def apply_compile(model: Transformer, enabled: bool) -> None:
    if not enabled:
        return
    modules: list[nn.Module] = [model.norm]
    for block in model.layers:
        modules += [block.attention_norm, block.attention, block.ffn_norm]
        if isinstance(block.ffn, SwiGLU):
            modules.append(block.ffn)
    for module in modules:
        set_kernels(module, False)  # Inductor fuses the PyTorch code; Dynamo must not trace Triton Functions
        module.compile(backend=BACKEND, fullgraph=True, dynamic=False)
    activation = torch.compile(silu_mul, backend=BACKEND, fullgraph=True, dynamic=True)
    for block in model.layers:
        if isinstance(block.ffn, MoE):
            block.ffn.experts.activation = activation
