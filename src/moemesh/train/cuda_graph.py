"""The training step as one CUDA graph (`train.cuda_graph`): on one GPU ("auto" or "on"), and with "on" on a
mesh without expert parallelism.

A small model's step is host-bound: the host issues ~1,500 launches (forward, backward, clipping, AdamW,
router bias) and the GPU waits between them. Captured once, the step is replayed with one launch, and the
GPU runs it back to back. Capture records the kernels without running them: the trainer runs its first
steps eagerly (they build the optimizer state, compile the Triton kernels and create the NCCL
communicators), captures at the start of the next step and replays the graph at once, so every step is
computed once and leaves its own values (losses, routing statistics) behind. A run of no more steps than
the eager ones captures nothing. The graph's memory pool keeps the step's activations reserved between
steps, so a validation loss's activations come on top of them.

On a mesh the NCCL collectives of the step (TP's all-reduces and sequence-parallel gathers, the gradient
buckets' all-reduces launched from backward hooks, the clipping norm's and the losses' all-reduces) are
captured too: NCCL runs them inside the graph. The host then waits in no collective during a step, so the
collective watchdog cannot see a hang there; the training loop watches its reads of a graphed step's
results instead (`Trainer.reading`). "auto" leaves a mesh's step op by op for now (`MESH_AUTO`): a graph
that captured NCCL collectives must be destroyed before the process group (`CapturedStep.close`), and that
exit path of `moemesh train` has not yet run on GPUs (tests/gpu/test_mesh_cuda_graph.py checks it).

What makes the step capturable is decided in one place (`unsupported`):
  - a CUDA device;
  - no expert parallelism (parallel.ep=1): the expert all-to-all needs its split sizes on the host;
  - no collective order check on a mesh (parallel.check_collectives): it compares fingerprints on the host;
  - dropless dispatch: capacity drops give data-dependent shapes;
  - experts on `torch._grouped_mm` (bf16 rows of 16-byte multiples, compute capability >= 9.0): its
    per-expert fallback reads the row offsets on the host;
  - bf16 parameters with the one-pass master step (`fused_adamw.py`): its learning rate, step count,
    clipping factor and non-finite check are device tensors, so no value of the step lives on the host;
  - no `train.compile` (Dynamo's guards run on the host, which a replay skips).
Everything a step reads or writes keeps its address: the batch is copied into the graph's input
buffer, gradients stay allocated between steps (the graph writes them, it does not accumulate; on a mesh
they are views of the gradient buckets), and the values a step returns are copied out after each replay,
since the next replay overwrites them.
"""

from __future__ import annotations

import math
from typing import Callable

import torch

from moemesh.config import Config
from moemesh.errors import UserError
from moemesh.model.grouped import grouped_mm_runs

WARMUP_STEPS = 2  # eager steps before the capture: optimizer state exists and the Triton kernels are built
# Whether "auto" captures a mesh's step where it can ("on" always does). False until `moemesh train`'s exit
# with a captured mesh step has run on GPUs: its first run hung in the process group's teardown, and the
# fix (`CapturedStep.close`) is not yet measured there.
MESH_AUTO = False


def unsupported(cfg: Config, device_type: str, layout: tuple[int, int, int] | None, fused_master: bool,
                capability: tuple[int, int] | None) -> str | None:
    """Why this run's step cannot be one CUDA graph, or None when it can. `layout`: the mesh's (dp, ep, tp),
    None without a mesh; `capability`: the CUDA device's compute capability, None where it is not known
    (a launcher's process, which does not touch the GPUs: each rank checks its own)."""
    if device_type != "cuda":
        return f"the device is {device_type!r} (train.device={cfg.train.device!r}), not a CUDA GPU"
    if layout is not None and layout[1] > 1:
        return f"parallel.ep={layout[1]}: the expert all-to-all needs its split sizes on the host"
    if layout is not None and cfg.parallel.check_collectives:
        return "parallel.check_collectives=true compares every collective's fingerprint on the host"
    if cfg.model.dispatch != "dropless":
        return f"model.dispatch={cfg.model.dispatch!r}"
    if capability is not None and not grouped_mm_runs(torch.bfloat16, (cfg.model.dim, cfg.model.ffn_dim), capability):
        return (f"the experts cannot use torch._grouped_mm (model.dim={cfg.model.dim} and model.ffn_dim="
                f"{cfg.model.ffn_dim} must be multiples of 8, on a GPU of compute capability >= 9.0)")
    if not fused_master:
        return "the step is not the one-pass master step (needs bf16 parameters and train.fused_master_step=true)"
    if cfg.train.compile:
        return "train.compile=true"
    return None


def wanted(cfg: Config, device: torch.device, layout: tuple[int, int, int] | None, fused_master: bool,
           on_rank: bool = True) -> bool:
    """'auto': where the step can be captured (on a mesh only with `MESH_AUTO`); 'on': there, and a one-line
    error elsewhere. `on_rank`: this process trains on `device` (False in a launcher, whose ranks check their
    own GPU's capability)."""
    if not asked(cfg, layout):
        return False
    capability = torch.cuda.get_device_capability(device) if device.type == "cuda" and on_rank else None
    reason = unsupported(cfg, device.type, layout, fused_master, capability)
    if reason is not None and cfg.train.cuda_graph == "on":
        raise UserError(f"train.cuda_graph='on' cannot capture this run's step: {reason} (use 'auto' or 'off')")
    return reason is None


def asked(cfg: Config, layout: tuple[int, int, int] | None) -> bool:
    """Whether the config asks for a graph at this layout: "on"; "auto" on one GPU (on a mesh: `MESH_AUTO`)."""
    if cfg.train.cuda_graph == "auto":
        return layout is None or MESH_AUTO
    return cfg.train.cuda_graph == "on"


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

    def close(self) -> None:
        """Destroy the graph now. A graph that captured NCCL collectives holds a reference on their
        communicators, and NCCL's communicator teardown waits until every such graph is gone: a graph still
        alive at `destroy_process_group` hangs the rank's exit (seen on 2 H200s: pytorch/pytorch#115388)."""
        torch.cuda.synchronize()
        self.graph.reset()
        self.outputs = ()


def planned(cfg: Config, layout: tuple[int, int, int], capability: tuple[int, int]) -> bool:
    """Whether `cfg` trained at `layout` (dp, ep, tp) on CUDA GPUs of this compute capability (with Triton)
    replays its step as one graph: what the planner assumes of the machine it plans for. One GPU runs
    without a mesh (`moemesh train`); more GPUs have one."""
    from moemesh.train.precision import param_dtype

    mesh = None if math.prod(layout) == 1 else tuple(layout)
    # loop.fused_master_wanted on a CUDA device (the loop itself imports too much for the planner)
    fused_master = cfg.train.fused_master_step and param_dtype(cfg, torch.device("cuda")) == torch.bfloat16
    return asked(cfg, mesh) and unsupported(cfg, "cuda", mesh, fused_master, capability) is None
