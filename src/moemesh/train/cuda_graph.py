"""The single-GPU training step as one CUDA graph (`train.cuda_graph`).

A small model's step is host-bound: the host issues ~1,500 launches (forward, backward, clipping, AdamW,
router bias) and the GPU waits between them. Captured once, the step is replayed with one launch, and the
GPU runs it back to back. Capture records the kernels without running them: the trainer runs its first
steps eagerly (they build the optimizer state and compile the Triton kernels), captures at the start of
the next step and replays the graph at once, so every step is computed once and leaves its own values
(losses, routing statistics) behind. A run of no more steps than the eager ones captures nothing. The
graph's memory pool keeps the step's activations reserved between steps, so a validation loss's
activations come on top of them.

What makes the step capturable is decided in one place (`unsupported`):
  - one process on a CUDA device, without a mesh: the expert all-to-all needs its split sizes on the
    host, and a mesh's collectives and their bookkeeping are not captured;
  - dropless dispatch: capacity drops give data-dependent shapes;
  - experts on `torch._grouped_mm` (bf16 rows of 16-byte multiples, compute capability >= 9.0): its
    per-expert fallback reads the row offsets on the host;
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
from moemesh.model.grouped import grouped_mm_runs

WARMUP_STEPS = 2  # eager steps before the capture: optimizer state exists and the Triton kernels are built


def unsupported(cfg: Config, device_type: str, ranks: int | None, fused_master: bool,
                capability: tuple[int, int] | None) -> str | None:
    """Why this run's step cannot be one CUDA graph, or None when it can. `ranks`: the mesh's size, None
    without a mesh; `capability`: the CUDA device's compute capability."""
    if device_type != "cuda":
        return f"train.device is {device_type!r}"
    if ranks is not None:
        return f"the run has a mesh of {ranks} rank(s)"
    if cfg.model.dispatch != "dropless":
        return f"model.dispatch={cfg.model.dispatch!r}"
    if not grouped_mm_runs(torch.bfloat16, (cfg.model.dim, cfg.model.ffn_dim), capability):
        return (f"the experts cannot use torch._grouped_mm (model.dim={cfg.model.dim} and model.ffn_dim="
                f"{cfg.model.ffn_dim} must be multiples of 8, on a GPU of compute capability >= 9.0)")
    if not fused_master:
        return "the step is not the one-pass master step (needs bf16 parameters and train.fused_master_step=true)"
    if cfg.train.compile:
        return "train.compile=true"
    return None


def wanted(cfg: Config, device: torch.device, ranks: int | None, fused_master: bool) -> bool:
    """'auto': where the step can be captured; 'on': there, and a one-line error elsewhere."""
    if cfg.train.cuda_graph == "off":
        return False
    local = device.type == "cuda" and ranks is None  # (a launcher's process need not touch the GPU)
    capability = torch.cuda.get_device_capability(device) if local else None
    reason = unsupported(cfg, device.type, ranks, fused_master, capability)
    if reason is not None and cfg.train.cuda_graph == "on":
        raise UserError(f"train.cuda_graph='on' cannot capture this run's step: {reason} (use 'auto' or 'off')")
    return reason is None


class CapturedStep:
    """`update(batch_BS) -> tuple of device tensors`, captured once and replayed for every later batch of
    the same shape. The caller leaves every gradient None before the capture and never touches them after."""

    def __init__(self, update: Callable[[torch.Tensor], tuple[torch.Tensor, ...]], example_BS: torch.Tensor):
        self.batch_BS = torch.empty_like(example_BS)
        self.graph = torch.cuda.CUDAGraph()
        # (entering syncs and empties the cache, so the graph's pool takes the eager steps' blocks.) The
        # batch thread may pin memory meanwhile: only this thread's CUDA calls are checked for capture.
        with torch.cuda.graph(self.graph, capture_error_mode="thread_local"):
            self.outputs = update(self.batch_BS)

    def __call__(self, batch_BS: torch.Tensor) -> tuple[torch.Tensor, ...]:
        self.batch_BS.copy_(batch_BS, non_blocking=True)
        self.graph.replay()
        return tuple(out.clone() for out in self.outputs)


def planned(cfg: Config, world_size: int, capability: tuple[int, int]) -> bool:
    """Whether `cfg` trained on CUDA GPUs of this compute capability (with Triton) at this world size
    replays its step as one graph: what the planner assumes of the machine it plans for. One GPU runs
    without a mesh (`moemesh train`); more GPUs have one."""
    from moemesh.train.precision import param_dtype

    ranks = None if world_size == 1 else world_size
    # loop.fused_master_wanted on a CUDA device (the loop itself imports too much for the planner)
    fused_master = cfg.train.fused_master_step and param_dtype(cfg, torch.device("cuda")) == torch.bfloat16
    return cfg.train.cuda_graph != "off" and unsupported(cfg, "cuda", ranks, fused_master, capability) is None
