"""`train.fused_kernels`: the memory-bound chains of a block as Triton kernels (moemesh.kernels), switched
on from outside the model like compile and activation checkpointing. On CUDA, with triton installed:

  RMSNorm         one kernel each way instead of ~6 forward and more backward;
  rotary          on q and k in [B, S, H, Dh] layout, one kernel each way instead of 24 strided ones a layer;
  SwiGLU          silu(gate) * up in one kernel each way (experts, dense MLPs and shared experts), one
                  fewer R*F tensor kept for backward;
  MoE dispatch    the combine (weights, gather, sum over choices) and the token gather's backward, one
                  kernel each (when every assignment is kept; capacity drops keep the PyTorch path).
The kernels compute in fp32 and round once; the PyTorch code stays the CPU path and the reference the
tests compare them with. `train.compile` recompiles the norms, attention and activations from their
PyTorch code (apply_compile runs after this and switches those back).
"""

from __future__ import annotations

from torch import nn

from moemesh.config import Config
from moemesh.kernels.swiglu import swiglu
from moemesh.model.attention import Attention
from moemesh.model.layers import RMSNorm, SwiGLU, silu_mul
from moemesh.model.moe import MoE
from moemesh.model.transformer import Transformer


def fused_kernels_on(cfg: Config, device_type: str) -> bool:
    """Whether a run of `cfg` on `device_type` uses the kernels, where triton is installed (CUDA builds of
    torch bring it; the Trainer also checks that, the planner assumes it for the GPUs it plans for)."""
    return cfg.train.fused_kernels and device_type == "cuda"


def apply_fused_kernels(model: Transformer, enabled: bool) -> None:
    if enabled:
        set_kernels(model, True)


def set_kernels(module: nn.Module, on: bool) -> None:
    """Switch the kernels on or off in `module` and every module inside it (the one place that knows
    which module takes which kernel; `train.compile` switches them off where it compiles)."""
    for part in module.modules():
        if isinstance(part, RMSNorm):
            part.fused = on
        elif isinstance(part, Attention):
            part.fused_rotary = on
        elif isinstance(part, SwiGLU):
            part.activation = swiglu if on else silu_mul
        elif isinstance(part, MoE):
            part.experts.activation = swiglu if on else silu_mul
            part.dispatcher.fused = on
