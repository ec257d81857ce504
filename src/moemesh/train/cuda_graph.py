"""The single-GPU training step as one CUDA graph (`train.cuda_graph`).

A small model's step is host-bound: the host issues ~1,500 launches (forward, backward, clipping, AdamW,
router bias) and the GPU waits between them. Captured once, the step is replayed with one launch, and the
GPU runs it back to back. Capture records the kernels without running them, so the trainer captures
after its first eager steps (which build the optimizer state and compile the Triton kernels) and replays
the graph from the next step on; every step is still computed once.

What makes the step capturable is decided in one place (`unsupported`):
  - one process on a CUDA device: the expert all-to-all needs its split sizes on the host;
  - dropless dispatch: capacity drops give data-dependent shapes;
  - bf16 parameters with the one-pass master step (`fused_adamw.py`): its learning rate, step count,
    clipping factor and non-finite check are device tensors, so no value of the step lives on the host;
  - no `train.compile` (Dynamo's guards run on the host, which a replay skips).
Everything a step reads or writes keeps its address: the batch is copied into the graph's input
buffer, gradients stay allocated between steps (the graph writes them, it does not accumulate), and the
values a step returns are copied out after each replay, since the next replay overwrites them.
"""

from __future__ import annotations

from typing import Callable

import torch

from moemesh.config import Config
from moemesh.errors import UserError

WARMUP_STEPS = 2  # eager steps before the capture: optimizer state exists and the Triton kernels are built


def unsupported(cfg: Config, device_type: str, world_size: int, fused_master: bool) -> str | None:
    """Why this run's step cannot be one CUDA graph, or None when it can."""
    if device_type != "cuda":
        return f"train.device is {device_type!r}"
    if world_size > 1:
        return f"the mesh has {world_size} ranks"
    if cfg.model.dispatch != "dropless":
        return f"model.dispatch={cfg.model.dispatch!r}"
    if not fused_master:
        return "the step is not the one-pass master step (needs bf16 parameters and train.fused_master_step=true)"
    if cfg.train.compile:
        return "train.compile=true"
    return None


def wanted(cfg: Config, device: torch.device, fused_master: bool) -> bool:
    """'auto': where the step can be captured; 'on': there, and a one-line error elsewhere."""
    if cfg.train.cuda_graph == "off":
        return False
    reason = unsupported(cfg, device.type, cfg.parallel.world_size, fused_master)
    if reason is not None and cfg.train.cuda_graph == "on":
        raise UserError(f"train.cuda_graph='on' needs one process on a CUDA device, model.dispatch='dropless', "
                        f"bf16 parameters with train.fused_master_step=true and train.compile=false; here {reason} "
                        f"(use 'auto' or 'off')")
    return reason is None


class CapturedStep:
    """`update(batch_BS) -> tuple of device tensors`, captured once and replayed for every later batch of
    the same shape. The caller leaves every gradient None before the capture and never touches them after."""

    def __init__(self, update: Callable[[torch.Tensor], tuple[torch.Tensor, ...]], example_BS: torch.Tensor):
        self.batch_BS = torch.empty_like(example_BS)
        self.graph = torch.cuda.CUDAGraph()
        torch.cuda.synchronize()
        torch.cuda.empty_cache()  # the eager steps' cached blocks: the graph gets its own pool
        with torch.cuda.graph(self.graph):
            self.outputs = update(self.batch_BS)

    def __call__(self, batch_BS: torch.Tensor) -> tuple[torch.Tensor, ...]:
        self.batch_BS.copy_(batch_BS, non_blocking=True)
        self.graph.replay()
        return tuple(out.clone() for out in self.outputs)


def planned(cfg: Config, world_size: int) -> bool:
    """Whether `cfg` trained on CUDA GPUs (with Triton) at this world size replays its step as one graph:
    what the planner assumes of the machine it plans for."""
    from moemesh.train.loop import param_dtype

    fused_master = cfg.train.fused_master_step and param_dtype(cfg, torch.device("cuda")) == torch.bfloat16
    return cfg.train.cuda_graph != "off" and unsupported(cfg, "cuda", world_size, fused_master) is None
