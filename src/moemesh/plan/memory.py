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
    params: int  # bytes of this rank's parameter shards
    grads: int
    optimizer: int
    activations: int
    full_model: int  # the whole model, built once on each rank's host before it is sharded
    overhead: int

    @property
    def device(self) -> int:
        """Peak on the training device (host RAM on CPU)."""
        return self.params + self.grads + self.optimizer + self.activations + self.overhead

    @property
    def device_peak(self) -> int:
        """The model is built whole on the device first, before training allocates the rest."""
        return max(self.device, self.full_model + self.overhead)


def estimate(cfg: Config, device_type: str) -> MemoryEstimate:
    import torch

    from moemesh.model.transformer import Transformer
    from moemesh.parallel.layout import build_layout

    m, p, t = cfg.model, cfg.parallel, cfg.train
    with torch.device("meta"):
        model = Transformer(m)
    layout = build_layout(model, p.dp, p.ep, p.tp, p.sequence_parallel)
    local = sum(math.prod(layout.local_shape(name)) for name in layout.params)
    full = sum(math.prod(pl.full_shape) for pl in layout.params.values())
    amp = t.dtype == "bfloat16" or (t.dtype == "auto" and device_type == "cuda")
    b = 2 if amp else 4
    tokens = t.global_batch // (p.dp * p.ep) * t.seq_len
    num_moe = m.n_layers - m.num_dense_layers
    k, tp = m.top_k, p.tp
    per_moe = b * tokens * (2 * k * m.dim + 3 * k * m.ffn_dim // tp) + FP32 * tokens * (k * m.dim + 2 * m.num_experts)
    per_moe += b * tokens * 3 * m.num_shared_experts * m.ffn_dim // tp
    per_dense = b * tokens * 3 * m.dense_ffn_dim // tp
    per_layer = b * tokens * 10 * m.dim
    head = FP32 * tokens * 3 * m.vocab_size // tp
    activations = m.n_layers * per_layer + num_moe * per_moe + m.num_dense_layers * per_dense + head
    # bf16 parameters keep fp32 masters (and their fp32 gradients) beside them: 2 + 4 bytes each
    per_param = 2 + FP32 if (t.param_dtype == "bfloat16" or (t.param_dtype == "auto" and amp and device_type == "cuda")) \
        else FP32
    return MemoryEstimate(params=per_param * local, grads=per_param * local, optimizer=2 * FP32 * local,
                          activations=activations, full_model=FP32 * full, overhead=PROCESS_OVERHEAD[device_type])


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
    return (f"parameters {est.params / GIB:.2f}, gradients {est.grads / GIB:.2f}, AdamW {est.optimizer / GIB:.2f}, "
            f"activations {est.activations / GIB:.2f}, full model at build {est.full_model / GIB:.2f}, "
            f"runtime {est.overhead / GIB:.2f}")


def ranks_on_this_host(cfg: Config) -> int:
    return int(os.environ.get("LOCAL_WORLD_SIZE", cfg.parallel.world_size))
