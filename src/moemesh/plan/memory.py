"""Per-rank memory of a run, estimated from the config and the placement table before anything is
allocated (the layout planner extends this module; the sharding itself is read from `parallel/layout.py`,
never modelled a second time).

Terms per rank: parameters, gradients and AdamW moments (fp32, local shards from the table); the full
model that every rank builds on its device before slicing out its shards (`train.loop.build_model`);
activations kept for backward by the real code path (below); and a fixed runtime overhead per process.

Activations of one micro-batch of T = global_batch / (dp*ep) * seq_len tokens, b bytes per element
(2 under bf16 autocast, else 4), per layer: norms, q/k/v, attention output and the projections' inputs,
about 10 * T * D elements (q/k/v/out split over TP); the MoE rows gathered and returned, K * T * D each,
the experts' hidden activations 3 * K * T * F / tp, the fp32 combine buffer K * T * D and the fp32
router logits/probabilities 2 * T * E; at the head, fp32 logits, softmax and gradient, 3 * T * V / tp.
Activation checkpointing (`train.activation_checkpointing`, train/recompute.py) keeps only the input of
each recomputed module (T * D) plus, during its backward, one module's activations again. With ep > 1
the token all-to-all's send and receive rows of one layer (K * T * D each) are added; the planner passes
an imbalance factor (max/mean rows an expert rank receives) that scales the expert rows.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass

from moemesh.config import Config
from moemesh.errors import UserError, report

GIB = 1024 ** 3
PROCESS_OVERHEAD = {"cpu": 0.45 * GIB, "cuda": 1.0 * GIB}  # torch runtime, CUDA context, allocator slack
FP32 = 4


@dataclass
class MemoryEstimate:
    params: int  # bytes of this rank's parameter shards (bf16 parameters: bf16 copy + fp32 masters)
    grads: int  # gradients alive with the activations during backward (bf16 parameters: bf16 gradients,
    # or the fp32 gradient buckets with parallel.overlap_grad_reduce)
    optimizer: int
    activations: int
    full_model: int  # the whole model, built once on each rank's host before it is sharded
    overhead: int
    a2a_buffers: int = 0  # expert all-to-all send/receive rows alive in a MoE layer (ep > 1)
    master_grads: int = 0  # bf16 parameters: the fp32 master gradients, alive from sync to the update

    @property
    def device(self) -> int:
        """Peak on the training device (host RAM on CPU): the end of the forward pass (every activation
        kept, gradients arriving) or the optimizer step (fp32 master gradients), whichever is larger."""
        backward = self.grads + self.activations + self.a2a_buffers
        return self.params + self.optimizer + self.overhead + max(backward, self.master_grads)

    @property
    def device_peak(self) -> int:
        """The model is built whole on the device first, before training allocates the rest."""
        return max(self.device, self.full_model + self.overhead)


def estimate(cfg: Config, device_type: str) -> MemoryEstimate:
    import torch

    from moemesh.model.transformer import Transformer
    from moemesh.parallel.layout import build_layout

    p = cfg.parallel
    with torch.device("meta"):
        model = Transformer(cfg.model)
    return estimate_layout(cfg, device_type, build_layout(model, p.dp, p.ep, p.tp, p.sequence_parallel))


def estimate_layout(cfg: Config, device_type: str, layout, imbalance: float = 1.0) -> MemoryEstimate:
    """The estimate for `cfg` at the placement table `layout` (its dp/ep/tp win over cfg.parallel's).

    `imbalance` is max/mean of the rows an expert rank receives (the planner's margin for natural
    routing); it scales the expert rows' activations and all-to-all buffers only."""
    m, t = cfg.model, cfg.train
    local = sum(math.prod(layout.local_shape(name)) for name in layout.params)
    full = sum(math.prod(pl.full_shape) for pl in layout.params.values())
    amp = t.dtype == "bfloat16" or (t.dtype == "auto" and device_type == "cuda")
    b = 2 if amp else 4
    tokens = t.global_batch // (layout.dp * layout.ep) * t.seq_len
    num_moe = m.n_layers - m.num_dense_layers
    k, tp = m.top_k, layout.tp
    rows = imbalance if layout.ep > 1 else 1.0  # with ep=1 a rank's rows are its own, whatever the routing
    per_moe_rows = int(rows * b * tokens * (2 * k * m.dim + 3 * k * m.ffn_dim // tp))
    per_moe = per_moe_rows + FP32 * tokens * (k * m.dim + 2 * m.num_experts)
    per_moe += b * tokens * 3 * m.num_shared_experts * m.ffn_dim // tp
    per_dense = b * tokens * 3 * m.dense_ffn_dim // tp
    per_layer = b * tokens * 10 * m.dim
    head = FP32 * tokens * 3 * m.vocab_size // tp
    kept_input = b * tokens * m.dim  # what a recomputed module keeps: its input
    mode = t.activation_checkpointing
    if mode == "moe":  # MoE layers keep their input; one layer's activations live again during its backward
        activations = (m.n_layers * per_layer + num_moe * kept_input + m.num_dense_layers * per_dense + head
                       + (per_moe if num_moe else 0))
    elif mode == "full":  # every block keeps its input; the block being back-propagated holds its own
        activations = m.n_layers * kept_input + head + per_layer + max(per_moe if num_moe else 0,
                                                                        per_dense if m.num_dense_layers else 0)
    else:
        activations = m.n_layers * per_layer + num_moe * per_moe + m.num_dense_layers * per_dense + head
    # the token all-to-all's send and receive buffers of one MoE layer (the receive side skewed by routing)
    a2a = int(b * tokens * k * m.dim * (1 + rows)) if layout.ep > 1 and num_moe else 0
    masters = t.param_dtype == "bfloat16" or (t.param_dtype == "auto" and amp and device_type == "cuda")
    # bf16 parameters keep fp32 masters beside them (2 + 4 bytes each); backward makes bf16 gradients,
    # which become fp32 master gradients after it (train/master.py), when the activations are gone. With
    # overlap_grad_reduce the fp32 gradient buckets (parallel/grad_buckets.py) live through the whole step.
    per_param = 2 + FP32 if masters else FP32
    buckets = cfg.parallel.overlap_grad_reduce and layout.world_size > 1
    grads = (2 if masters and not buckets else FP32) * local
    return MemoryEstimate(params=per_param * local, grads=grads, optimizer=2 * FP32 * local,
                          activations=activations, full_model=FP32 * full, overhead=PROCESS_OVERHEAD[device_type],
                          a2a_buffers=a2a, master_grads=FP32 * local if masters else 0)


def host_memory_available() -> int | None:
    try:
        with open("/proc/meminfo") as f:
            fields = dict(line.split(":", 1) for line in f)
        return int(fields["MemAvailable"].split()[0]) * 1024
    except (OSError, KeyError, ValueError):
        return None


def check_memory(cfg: Config, device_type: str, ranks_here: int) -> MemoryEstimate:
    """Refuse (one line, exit 2) a run whose ranks cannot fit in this machine's memory."""
    est = estimate(cfg, device_type)
    host = host_memory_available()
    where = f"parallel.dp*ep*tp={cfg.parallel.world_size}"
    if device_type == "cuda":
        import torch

        free, total = torch.cuda.mem_get_info()
        if est.device_peak > total:
            raise UserError(f"the run needs ≈{est.device_peak / GIB:.1f} GiB per GPU ({_parts(est)}) at {where}; "
                            f"this GPU has {total / GIB:.1f} GiB (use more ranks, a smaller model or batch)")
        host_need = ranks_here * PROCESS_OVERHEAD["cpu"]
    else:
        host_need = ranks_here * (est.device + est.full_model)
    if host is not None and host_need > host:
        raise UserError(f"the run needs ≈{host_need / GIB:.1f} GiB of host memory for {ranks_here} local "
                        f"rank(s) (≈{host_need / ranks_here / GIB:.2f} GiB each: {_parts(est)}); this machine has "
                        f"{host / GIB:.1f} GiB available (use fewer ranks, a smaller model or batch)")
    if cfg.train.steps > 10 ** 8:
        report(f"warning: train.steps={cfg.train.steps}: at 100 steps/s this takes "
               f"{cfg.train.steps / 100 / 86400 / 365:.0f} years")
    return est


def _parts(est: MemoryEstimate) -> str:
    return (f"parameters {est.params / GIB:.2f}, gradients {max(est.grads, est.master_grads) / GIB:.2f}, "
            f"AdamW {est.optimizer / GIB:.2f}, "
            f"activations {est.activations / GIB:.2f}, full model at build {est.full_model / GIB:.2f}, "
            f"runtime {est.overhead / GIB:.2f}")


def ranks_on_this_host(cfg: Config) -> int:
    return int(os.environ.get("LOCAL_WORLD_SIZE", cfg.parallel.world_size))
