"""Step-time cost model of one training step on one rank, and its calibration.

    t_step = t_device + t_idle,  t_device = t_gemm + t_grouped_gemm + t_attention + t_elementwise + t_head
                                             + t_optimizer + t_tp + t_ep + t_dp
    On one GPU, and on a mesh that replays its step as one CUDA graph (train.cuda_graph=on, ep=1), t_idle is
    the gaps between the step's kernels (below). On a mesh launched op by op the host is as slow as the
    device: t_device + t_idle = (t_device^p + t_host^p)^(1/p), a soft
    maximum of the device's time and the host's (p = mesh_overlap_p: 1 when they add up, large when each
    hides the other), t_host per layer and per step (`mesh_host_time`). The collectives are counted in full:
    the gradient all-reduce overlaps the backward pass (parallel.overlap_grad_reduce), but fits that scale
    it by 0.5-2 did no better on 2 H200s (docs/planner.md): its kernels slow the compute beside them.

Each compute term models one kernel class of a profiled step (plan/kernels.py) and is fitted to THAT
class's measured GPU time across the calibration configs (bench/plan_validate.py), t_idle to what is left
of the measured step time; the symbols are the constants' names (`Constants` says what each means):

  t_gemm         sum over dense GEMM classes of FLOPs / peak * (gemm_a + gemm_b * N0 / n), n the class's
                 smallest dim: attention projections and dense/shared MLPs (tokens, D/tp), the router
                 (E columns, counted as N_MIN), the output projection (tokens, V/tp, D)
  t_grouped_gemm the experts: FLOPs / peak * (grouped_a + grouped_b * N0 / n), n = min(rows per local
                 expert, F/tp, D), plus grouped_us per local expert per grouped GEMM (9 per MoE layer:
                 3 forward, 3 data gradients, 3 weight gradients): the fixed cost of each expert's problem
                 (its tiles' prologue and epilogue, partial tiles) that makes many small experts slow
  t_attention    causal attention FLOPs / peak * (attn_a + attn_b * S0 / S): short sequences run a larger
                 share of partial (diagonal) tiles
  t_elementwise  bytes / copy bandwidth: elem_layer * 2*T*D per layer (norms, rotary, residual adds),
                 elem_moe * 2*K*T*D per MoE layer (gather, combine, weighting), elem_ffn * 2*K*T*F/tp per MoE
                 layer (the SwiGLU activation), elem_vocab * 2*T*V/tp (the logits' casts), plus elem_us per
                 layer pass (small kernels: launch-bound, not byte-bound)
  t_head         head_bytes * the fp32 logits' bytes (4*T*V/tp) / copy bandwidth: log-softmax and NLL,
                 forward and backward
  t_optimizer    opt_bytes per local parameter / copy bandwidth + opt_us per parameter tensor (one AdamW
                 pass per tensor, the gradient norm)
  t_idle         the device waiting for the host. One GPU: per layer and per step, with its own constants
                 for a step launched op by op (idle_layer_ms, idle_step_ms: launch gaps of a host-bound step)
                 and for a step replayed as one CUDA graph (graph_idle_layer_ms, graph_idle_step_ms: the
                 gaps between the graph's kernels, the logged steps' syncs); fitted to measured step time
                 minus the summed kernel time, of runs launched the same way. A single-GPU step is one graph
                 (train.cuda_graph, train/cuda_graph.py), and so is a mesh's without expert parallelism,
                 whose collectives run inside it: the graph's constants again. A mesh launched op by op
                 (ep > 1, or the graph turned off): the soft maximum above minus t_device,
                 with t_host = mesh_host_step_ms + per layer pass mesh_host_layer_ms, + mesh_host_tp_layer_ms
                 when tp > 1, + mesh_host_sync_layer_ms when dp*ep > 1 (the gradient buckets' hooks), and
                 mesh_host_ep_moe_ms per MoE layer pass when ep > 1 (the split sizes' syncs); fitted with p
                 to measured multi-GPU step times (`fit_mesh`; bench/mesh_sweep.sh's runs, skeleton configs
                 with tiny dims among them, whose step is host time alone)
  t_tp           per layer 2 all-reduces forward + 2 backward of T*D bf16 (attention, FFN), 2 more at the
                 embedding and head; ring time 2(n-1)/n * bytes / bus bandwidth (+ latency) on NVLink when
                 tp <= GPUs per node, else on the inter-node link; times tp_comm (fitted on 2 H200s)
  t_ep           per MoE layer 4 token all-to-alls (dispatch and combine, forward and backward) of
                 K*T*D bf16 * imbalance, (n-1)/n of it leaves the rank; plus the count exchange's latency
                 and host sync
  t_dp           fp32 gradient all-reduce: dense gradients over data x expert, expert gradients over data
Activation checkpointing adds the recomputed forward: 1/3 of the MoE layers' GEMMs and elementwise bytes
("moe") or of the blocks' ("full"), and their forward collectives. Each term is linear in its constants,
so `fit` solves one small bounded least-squares problem per term; the bounds keep every GEMM at or below
the matmul peak and every byte term at or below the copy bandwidth (`PARAMS`).
"""

from __future__ import annotations

import bisect
import dataclasses
import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path

from moemesh.errors import UserError
from moemesh.plan.kernels import CLASSES as KERNEL_CLASSES

N0 = 1000.0  # GEMM size scale of the efficiency curves
N_MIN = 128  # smaller GEMM dims (the router's E columns) count as this: they are latency, not throughput
S0 = 1024.0  # sequence length scale of attention's efficiency curve
LATENCY_S = {"intra": 15e-6, "inter": 30e-6}  # per collective call
HOST_SYNC_S = 60e-6  # the EP count exchange's split sizes go to the host, once per MoE layer and pass
TERMS = (*KERNEL_CLASSES, "idle")  # the compute terms: one per kernel class, and the device's idle time
MESH_HOST = ("mesh_host_layer_ms", "mesh_host_step_ms", "mesh_host_tp_layer_ms", "mesh_host_ep_moe_ms",
             "mesh_host_sync_layer_ms")  # the host time of a step on a mesh: `mesh_host_time`
MESH = (*MESH_HOST, "mesh_overlap_p")  # the constants `fit_mesh` fits
MESH_DEVICE = ("tp_comm",)  # the constant `fit_tp` fits
AGAIN = 1 / 3  # a recomputed forward, as a share of forward + backward


@dataclass(frozen=True)
class GPU:
    name: str
    memory_gib: float  # what torch sees as total
    peak_tflops: float  # bf16 dense matmul, measured (H200) or scaled like the H200's measured/spec
    copy_gbs: float  # device memory copy bandwidth (read + write), GB/s
    # NCCL bus bandwidth (GB/s) by message size in MB, inside a node (NVLink) ...
    nvlink_allreduce: tuple[tuple[float, float], ...]
    nvlink_alltoall: tuple[tuple[float, float], ...]
    inter_node_gbs: float  # ... and across nodes, per GPU (one NIC per GPU)
    source: str
    capability: tuple[int, int] = (9, 0)  # CUDA compute capability (torch._grouped_mm needs >= 9.0)


H200_AR = ((16, 152.0), (64, 228.0), (256, 275.0), (1024, 325.0))  # measured, ENV_NOTES (2 x H200, NV18)
H200_A2A = ((16, 101.0), (64, 190.0), (256, 254.0), (1024, 318.0))
GPUS = {
    "h200": GPU("h200", 140.4, 780.0, 4200.0, H200_AR, H200_A2A, 45.0,
                "measured here: matmul, copy, NCCL on NVLink (ENV_NOTES.md); inter-node assumed 400 Gb/s IB per GPU"),
    "h100": GPU("h100", 79.6, 780.0, 4200.0 * 3.35 / 4.8, H200_AR, H200_A2A, 45.0,
                "H200's measurements scaled: same compute and NVLink, HBM 3.35 vs 4.8 TB/s; 400 Gb/s IB assumed"),
    "a100": GPU("a100", 79.2, 780.0 * 312 / 989, 4200.0 * 2.04 / 4.8,
                tuple((s, b * 600 / 900) for s, b in H200_AR), tuple((s, b * 600 / 900) for s, b in H200_A2A), 22.0,
                "H200's measurements scaled by spec sheets (312 vs 989 TFLOP/s, 2.0 vs 4.8 TB/s, NVLink 600 vs 900 GB/s); "
                "200 Gb/s IB assumed", (8, 0)),
}


@dataclass(frozen=True)
class Constants:
    """The step-time model's constants, by term (fitted per term; lower bound in brackets). The byte
    terms are effective bytes moved per byte of the named tensor, timed at the copy bandwidth: a bound of
    1 (or the bytes the kernels must move) keeps them at or below it.

    gemm_a        1 / efficiency of large dense GEMMs [1: at most the measured matmul peak]
    gemm_b        dense GEMMs' small-dim penalty, + gemm_b * N0 / n to 1 / efficiency [0]
    grouped_a     1 / efficiency of large grouped (expert) GEMMs [1]
    grouped_b     grouped GEMMs' small-dim penalty, n = min(rows per local expert, F/tp, D) [0]
    grouped_us    microseconds per local expert per grouped GEMM call [0]
    attn_a        1 / efficiency of flash attention at long sequences [1]
    attn_b        attention's short-sequence penalty, + attn_b * S0 / S to 1 / efficiency [0]
    elem_layer    bytes per byte of each layer's bf16 activations T*D: norms, rotary, residual adds [0]
    elem_moe      bytes per byte of each MoE layer's routed rows K*T*D: gather, weighting, combine [0]
    elem_ffn      bytes per byte of each MoE layer's routed hidden rows K*T*F: the SwiGLU activation [0]
    elem_vocab    bytes per byte of the bf16 logits T*V: their casts to and from fp32 [0]
    elem_us       microseconds of launch-bound elementwise kernels per layer pass [0]
    head_bytes    bytes per byte of the fp32 logits 4*T*V: log-softmax and NLL, forward and backward
                  [2: one read and one write]
    opt_bytes     bytes per local parameter of the optimizer phase [30: the one-pass AdamW moves 28 (bf16
                  gradient and parameter, fp32 master and two moments read and written), the gradient
                  norm reads the gradient (2)]
    opt_us        microseconds per parameter tensor (one AdamW launch each) [0]
    idle_layer_ms milliseconds the device waits for the host per layer per step, launched op by op [0]
    idle_step_ms  milliseconds the device waits for the host per step, launched op by op [0]
    graph_idle_layer_ms  the same per layer, for a step replayed as one CUDA graph [0]
    graph_idle_step_ms   the same per step, for a step replayed as one CUDA graph [0]
    mesh_host_layer_ms       host milliseconds per layer pass of a step on a mesh (eager, several GPUs) [0]
    mesh_host_step_ms        the same per step [0]
    mesh_host_tp_layer_ms    more per layer pass with tensor parallelism (its collectives' launches) [0]
    mesh_host_ep_moe_ms      more per MoE layer pass with expert parallelism (the split sizes' host syncs) [0]
    mesh_host_sync_layer_ms  more per layer pass when gradients are synced over data x expert (their hooks) [0]
    mesh_overlap_p           how a mesh step's host and device time combine, (device^p + host^p)^(1/p): 1 adds
                             them, large p takes the larger [1]
    tp_comm       TP's collectives in a training step, per their time at the NCCL bandwidth table's bus
                  bandwidth [1: at most that bandwidth]; fitted to steps replayed as one CUDA graph at tp > 1,
                  whose time is the device's alone (`fit_tp`)
    """
    gemm_a: float
    gemm_b: float
    grouped_a: float
    grouped_b: float
    grouped_us: float
    attn_a: float
    attn_b: float
    elem_layer: float
    elem_moe: float
    elem_ffn: float
    elem_vocab: float
    elem_us: float
    head_bytes: float
    opt_bytes: float
    opt_us: float
    idle_layer_ms: float
    idle_step_ms: float
    graph_idle_layer_ms: float
    graph_idle_step_ms: float
    mesh_host_layer_ms: float
    mesh_host_step_ms: float
    mesh_host_tp_layer_ms: float
    mesh_host_ep_moe_ms: float
    mesh_host_sync_layer_ms: float
    mesh_overlap_p: float
    tp_comm: float = 1.0
    source: str = ""

    def gemm_efficiency(self, n: float) -> float:
        return n / (self.gemm_a * n + self.gemm_b * N0)

    def grouped_efficiency(self, n: float) -> float:
        return n / (self.grouped_a * n + self.grouped_b * N0)

    def attention_efficiency(self, seq_len: float) -> float:
        return seq_len / (self.attn_a * seq_len + self.attn_b * S0)


# constant -> (the term it belongs to, its lower bound); the order of `Constants`' fields
PARAMS = {"gemm_a": ("gemm", 1.0), "gemm_b": ("gemm", 0.0),
          "grouped_a": ("grouped_gemm", 1.0), "grouped_b": ("grouped_gemm", 0.0), "grouped_us": ("grouped_gemm", 0.0),
          "attn_a": ("attention", 1.0), "attn_b": ("attention", 0.0),
          "elem_layer": ("elementwise", 0.0), "elem_moe": ("elementwise", 0.0), "elem_ffn": ("elementwise", 0.0),
          "elem_vocab": ("elementwise", 0.0), "elem_us": ("elementwise", 0.0),
          "head_bytes": ("head", 2.0),
          "opt_bytes": ("optimizer", 30.0), "opt_us": ("optimizer", 0.0),
          "idle_layer_ms": ("idle", 0.0), "idle_step_ms": ("idle", 0.0),
          "graph_idle_layer_ms": ("idle", 0.0), "graph_idle_step_ms": ("idle", 0.0),
          **{name: ("mesh", 0.0) for name in MESH_HOST}, "mesh_overlap_p": ("mesh", 1.0), "tp_comm": ("tp", 1.0)}
# The idle constants of each launch mode of a single GPU: a step launched op by op, or replayed as one CUDA
# graph (a step on a mesh has host constants instead: MESH)
IDLE_MODES = {"eager": ("idle_layer_ms", "idle_step_ms"), "graph": ("graph_idle_layer_ms", "graph_idle_step_ms")}
LOWER = {name: lower for name, (_, lower) in PARAMS.items()}

# SHIPPED: this model's fit to the calibration runs of bench/results/plan_validate_v3.json,
# plan_validate_v3_rest.json (session 3: 18 configs, steps launched op by op) and plan_validate_v4.json
# (session 4: 13 configs, session 3's held-out list, each step one CUDA graph). Kernel classes are fitted on
# all 31 runs (the kernels did not change between the sessions); each idle pair on the runs launched its
# way. The 13 held-out configs of v4 are not used (nor v3's held-out runs, whose configs v4 re-measured).
# The op-by-op idle constants absorb host-bound gaps and, at 4096-8192-token sequences, the synthetic batch
# thread of that time (since made ~16x faster for small batches); they apply to `train.cuda_graph=off` only.
# The mesh's host constants and p are fitted (`fit_mesh`) to the 36 multi-GPU runs of session 5 and the 6
# op-by-op runs of session 6 (below), each in a fresh launch (bench/mesh_sweep.sh):
# bench/results/mesh_skeleton_x2.json (the `gpu` preset with tiny dims,
# 2 and 8 layers: host time alone), mesh_calibration_x2.json (6 configs) at (2,1,1), (1,2,1), (1,1,2), and
# mesh_calibration_x4.json (2 of the held-out set's configs at the six 4-GPU layouts: `mesh_sweep.sh
# heldout 4 'e64-k8|d4096'`). TP's collectives (tp_comm, `fit_tp`) are fitted to session 6's steps replayed
# as CUDA graphs at (1,1,2) in mesh_calibration_x2_graph.json (the same 6 configs; its op-by-op runs at
# (1,2,1) join the host fit). The runs of the mesh_heldout_* files are not used.
# Regenerate with `moemesh plan gpu --gpus 1 --calibrate FILE [--calibrate FILE ...] --json`; a test keeps
# these equal to the fit.
H200_CONSTANTS = Constants(gemm_a=1, gemm_b=0.1283, grouped_a=1.0946, grouped_b=0.098851, grouped_us=0.95245, attn_a=1.3641, attn_b=0.64988, elem_layer=60.255, elem_moe=12.105, elem_ffn=8.0481, elem_vocab=11.369, elem_us=482.58, head_bytes=7.7532, opt_bytes=32.093, opt_us=3.5059, idle_layer_ms=3.9489, idle_step_ms=1.8833, graph_idle_layer_ms=0.10297, graph_idle_step_ms=0.25703, mesh_host_layer_ms=6.5633, mesh_host_step_ms=10.849, mesh_host_tp_layer_ms=3.105, mesh_host_ep_moe_ms=2.1259, mesh_host_sync_layer_ms=2.046, mesh_overlap_p=1.4941, tp_comm=2.1746,
                           source="fitted to the calibration runs of bench/results/plan_validate_v3.json + "
                                  "plan_validate_v3_rest.json + plan_validate_v4.json (1 x H200); mesh host to "
                                  "mesh_skeleton_x2.json + mesh_calibration_x2.json + mesh_calibration_x4.json "
                                  "+ mesh_calibration_x2_graph.json (2 and 4 x H200)")


def _interp(table, size_mb: float) -> float:
    """Bus bandwidth at a message size: log-linear between measured sizes, flat outside them."""
    sizes = [s for s, _ in table]
    if size_mb <= sizes[0]:
        # below the smallest measurement bandwidth falls with size (latency-bound): scale linearly
        return table[0][1] * max(size_mb / sizes[0], 0.05)
    if size_mb >= sizes[-1]:
        return table[-1][1]
    i = bisect.bisect(sizes, size_mb)
    (s0, b0), (s1, b1) = table[i - 1], table[i]
    w = (math.log(size_mb) - math.log(s0)) / (math.log(s1) - math.log(s0))
    return b0 + w * (b1 - b0)


@dataclass
class Shape:
    """What the cost model needs of a (config, layout): counts per rank, from the config and the
    placement table's counts (plan/memory.py:param_counts)."""
    tokens: int  # T: tokens per data x expert coordinate
    dim: int
    ffn_dim: int
    top_k: int
    num_experts: int
    num_moe: int
    n_layers: int
    vocab: int
    seq_len: int
    attn_params: int  # wq, wk, wv, wo of one layer
    dense_ffn_params: int  # one dense layer's SwiGLU
    shared_params: int  # one MoE layer's shared experts
    local_params: int
    param_tensors: int  # parameter tensors per rank (the optimizer's launches)
    dense_grad_elems: int  # local elements all-reduced over data x expert
    expert_grad_elems: int  # over data


@dataclass
class StepTime:
    terms: dict[str, float]

    @property
    def total(self) -> float:
        return sum(self.terms.values())

    @property
    def bottleneck(self) -> str:
        return max(self.terms, key=self.terms.get)


def features(shape: Shape, dp: int, ep: int, tp: int, recompute: str, gpu: GPU, imbalance: float,
             graphed: bool) -> dict[str, float]:
    """Per constant, the seconds its part of a term takes at constant 1 (every term is the sum of its
    constants times these). `graphed`: the step is replayed as one CUDA graph."""
    s = shape
    peak = gpu.peak_tflops * 1e12
    bw = gpu.copy_gbs * 1e9
    rho = imbalance if ep > 1 else 1.0
    moe_again = AGAIN if recompute in ("moe", "full") else 0.0
    block_again = AGAIN if recompute == "full" else 0.0
    moe_passes = s.num_moe * (1 + moe_again)  # MoE layer passes (forward + backward = 1)
    rows_per_expert = s.tokens * s.top_k * ep / s.num_experts * rho
    n_dense = max(min(s.tokens, s.dim // tp, s.dim), N_MIN)
    dense = [  # (training FLOPs, smallest dim): attention projections + dense/shared MLPs, router, head
        (6 * s.tokens * (s.attn_params * s.n_layers + s.dense_ffn_params * (s.n_layers - s.num_moe)) / tp
         * (1 + block_again) + 6 * s.tokens * s.shared_params * moe_passes / tp, n_dense),
        (6 * s.tokens * s.dim * s.num_experts * moe_passes, N_MIN),
        (6 * s.tokens * s.vocab * s.dim / tp, max(min(s.tokens, s.vocab // tp, s.dim), N_MIN)),
    ]
    grouped = 6 * s.tokens * s.top_k * 3 * s.dim * s.ffn_dim / tp * rho * moe_passes
    n_grouped = max(min(rows_per_expert, s.ffn_dim / tp, s.dim), N_MIN)
    # flash attention runs 7 causal T*S*D products: 2 forward, 5 backward (the scores recomputed)
    attn = 7 * s.tokens * s.seq_len * s.dim * s.n_layers / tp * (1 + block_again)
    layer_passes = s.n_layers * (1 + block_again) + s.num_moe * (moe_again - block_again)
    routed = 2 * s.tokens * s.top_k * rho * moe_passes  # bf16 bytes per routed column, all MoE layer passes
    return {"gemm_a": sum(f for f, _ in dense) / peak, "gemm_b": sum(f * N0 / n for f, n in dense) / peak,
            "grouped_a": grouped / peak, "grouped_b": grouped * N0 / n_grouped / peak,
            "grouped_us": 9 * (s.num_experts // ep) * moe_passes * 1e-6,
            "attn_a": attn / peak, "attn_b": attn * S0 / s.seq_len / peak,
            "elem_layer": 2 * s.tokens * s.dim * s.n_layers * (1 + block_again) / bw,
            "elem_moe": routed * s.dim / bw, "elem_ffn": routed * s.ffn_dim / tp / bw,
            "elem_vocab": 2 * s.tokens * s.vocab / tp / bw, "elem_us": layer_passes * 1e-6,
            "head_bytes": 4 * s.tokens * s.vocab / tp / bw,
            "opt_bytes": s.local_params / bw, "opt_us": s.param_tensors * 1e-6,
            **launch_features(s, dp, ep, tp, graphed, recompute, layer_passes, moe_passes)}


def launch_features(s: Shape, dp: int, ep: int, tp: int, graphed: bool, recompute: str, layer_passes: float,
                    moe_passes: float) -> dict[str, float]:
    """The launch mode's constants' features, the others' 0: the idle constants of a step replayed as one
    CUDA graph (one GPU or a mesh), of one GPU's step launched op by op, or of the host of a mesh's step
    launched op by op (dp*ep*tp > 1). A recomputed forward counts as the device's AGAIN share of a
    layer pass where its launches run again: every op under "full", the MoE layer under "moe" (its
    all-to-alls and split syncs too), but TP's collectives only under "full" (they sit outside the
    recomputed function, as in `comm_terms`) and the gradient hooks never (once per backward)."""
    out = {name: 0.0 for names in IDLE_MODES.values() for name in names} | dict.fromkeys(MESH_HOST, 0.0)
    if dp * ep * tp > 1 and not graphed:
        blocks = s.n_layers * (1 + (AGAIN if recompute == "full" else 0.0))
        out.update(mesh_host_layer_ms=layer_passes * 1e-3, mesh_host_step_ms=1e-3,
                   mesh_host_tp_layer_ms=blocks * 1e-3 if tp > 1 else 0.0,
                   mesh_host_sync_layer_ms=s.n_layers * 1e-3 if dp * ep > 1 else 0.0,
                   mesh_host_ep_moe_ms=moe_passes * 1e-3 if ep > 1 else 0.0)
    else:
        layer, step = IDLE_MODES["graph" if graphed else "eager"]
        out.update({layer: s.n_layers * 1e-3, step: 1e-3})
    return out


def compute_terms(f: dict[str, float], c: Constants) -> dict[str, float]:
    """Seconds per term (TERMS) from `features` and the constants (a mesh's idle time comes later, from
    the host's: `step_time`)."""
    terms = dict.fromkeys(TERMS, 0.0)
    for name, (term, _) in PARAMS.items():
        if term in terms:
            terms[term] += f[name] * getattr(c, name)
    return terms


def mesh_host_time(f: dict[str, float], c: Constants) -> float:
    """Seconds the host of a step on a mesh takes to launch it (0 off a mesh)."""
    return sum(f[name] * getattr(c, name) for name in MESH_HOST)


def soft_max(device: float, host: float, p: float) -> float:
    """A step's time when the device and the host each take this long: their sum at p = 1, the larger
    one as p grows (the host runs ahead of the device only as far as the step's syncs let it)."""
    top = max(device, host)
    if top <= 0:
        return 0.0
    return top * ((device / top) ** p + (host / top) ** p) ** (1 / p)


def comm_terms(shape: Shape, dp: int, ep: int, tp: int, recompute: str, gpu: GPU, gpus_per_node: int,
               imbalance: float) -> dict[str, float]:
    s = shape

    def ring(n, nbytes, table, link, factor):
        if n == 1 or nbytes == 0:
            return 0.0
        bus = _interp(table, nbytes / 1e6) if link == "intra" else gpu.inter_node_gbs
        return factor(n) * nbytes / (bus * 1e9) + LATENCY_S[link]

    allreduce = lambda n: 2 * (n - 1) / n  # noqa: E731
    alltoall = lambda n: (n - 1) / n  # noqa: E731
    tp_link = "intra" if tp <= gpus_per_node else "inter"
    ep_link = "intra" if ep * tp <= gpus_per_node else "inter"
    world_link = "intra" if dp * ep * tp <= gpus_per_node else "inter"
    fwd_again = recompute == "full"
    tp_calls = 4 * s.n_layers + 4 + (2 * s.n_layers if fwd_again else 0)
    t_tp = tp_calls * ring(tp, 2 * s.tokens * s.dim, gpu.nvlink_allreduce, tp_link, allreduce)
    rho = imbalance if ep > 1 else 1.0
    a2a_calls = (4 + (2 if recompute in ("moe", "full") else 0)) * s.num_moe
    t_ep = a2a_calls * ring(ep, 2 * s.tokens * s.top_k * s.dim * rho, gpu.nvlink_alltoall, ep_link, alltoall)
    if ep > 1:
        t_ep += a2a_calls / 2 * HOST_SYNC_S
    t_dp = ring(dp * ep, 4 * s.dense_grad_elems, gpu.nvlink_allreduce, world_link, allreduce)
    t_dp += ring(dp, 4 * s.expert_grad_elems, gpu.nvlink_allreduce, world_link, allreduce)
    return {"tp_allreduce": t_tp, "ep_alltoall": t_ep, "dp_allreduce": t_dp}


def step_time(shape: Shape, dp, ep, tp, recompute, gpu: GPU, gpus_per_node: int, imbalance: float,
              constants: Constants, graphed: bool = False) -> StepTime:
    return step_terms(shape, dp, ep, tp, recompute, gpu, gpus_per_node, imbalance, constants, graphed)[0]


def step_terms(shape: Shape, dp, ep, tp, recompute, gpu: GPU, gpus_per_node: int, imbalance: float,
               constants: Constants, graphed: bool = False) -> tuple[StepTime, dict[str, float]]:
    """(the step's time by term, the features): on a mesh launched op by op its idle term is what the
    host adds to the device's time."""
    f = features(shape, dp, ep, tp, recompute, gpu, imbalance, graphed)
    terms = compute_terms(f, constants)
    terms.update(comm_terms(shape, dp, ep, tp, recompute, gpu, gpus_per_node, imbalance))
    terms["tp_allreduce"] *= constants.tp_comm
    if dp * ep * tp > 1 and not graphed:
        device = sum(terms.values())
        terms["idle"] = soft_max(device, mesh_host_time(f, constants), constants.mesh_overlap_p) - device
    return StepTime(terms), f


def shape_of(cfg, layout, counts=None) -> Shape:
    """`counts`: plan/memory.py:param_counts(layout), when the caller has it (the planner caches it)."""
    from moemesh.plan.memory import param_counts

    counts = counts or param_counts(layout)
    m, t = cfg.model, cfg.train
    head_dim = m.dim // m.n_heads
    return Shape(tokens=t.global_batch // (layout.dp * layout.ep) * t.seq_len, dim=m.dim, ffn_dim=m.ffn_dim,
                 top_k=m.top_k, num_experts=m.num_experts, num_moe=m.n_layers - m.num_dense_layers,
                 n_layers=m.n_layers, vocab=m.vocab_size, seq_len=t.seq_len,
                 attn_params=m.dim * (2 * m.n_heads + 2 * m.n_kv_heads) * head_dim,
                 dense_ffn_params=3 * m.dim * m.dense_ffn_dim, shared_params=3 * m.dim * m.ffn_dim * m.num_shared_experts,
                 local_params=counts.local, param_tensors=len(layout.params), dense_grad_elems=counts.dense_grad,
                 expert_grad_elems=counts.expert_local)


# --- calibration ---------------------------------------------------------------------------------------

# The configs of bench/train_e2e.py's labels (its JSON names runs by label only); a test keeps these
# equal to the script's CONFIGS. Its runs of the current code ("after") can be evaluated, not fitted
# (no kernel classes).
TRAIN_E2E_CONFIGS = {
    "gpu-preset": [],
    "mixtral-shaped": ["model.n_layers=2", "model.dim=4096", "model.ffn_dim=14336", "model.num_experts=8",
                       "model.top_k=2", "model.n_heads=32", "model.n_kv_heads=8", "model.vocab_size=32000",
                       "model.max_seq_len=4096", "train.seq_len=4096", "train.global_batch=4"],
    "fine-grained": ["model.n_layers=6", "model.dim=2048", "model.ffn_dim=1408", "model.num_experts=64",
                     "model.top_k=6", "model.n_heads=16", "model.n_kv_heads=4", "model.vocab_size=32000",
                     "model.max_seq_len=4096", "train.seq_len=4096", "train.global_batch=4"],
}
FIT_FORMAT = "moemesh plan_validate 3"  # the first format with kernel time per class
FIT_FORMATS = (FIT_FORMAT, "moemesh plan_validate 4")  # 4: and whether each run's step was a CUDA graph


@dataclass
class Run:
    label: str
    set: str  # "calibration" or "heldout"
    overrides: list[str]  # on the `gpu` preset
    step_s: float  # measured
    memory_gib: float | None  # measured torch.cuda.max_memory_allocated
    kernel_s: dict[str, float] | None = None  # measured GPU seconds per step by kernel class (format >= 3)
    graphed: bool = False  # the step was replayed as one CUDA graph (format 4 says; earlier ones were not)

    def term_s(self, term: str) -> float:
        """The measured counterpart of a compute term: its kernel class, or for idle the step time that no
        kernel accounts for (the timed run's step minus the profile's kernel time)."""
        if term == "idle":
            return self.step_s - sum(self.kernel_s.values())
        return self.kernel_s[term]


def load_runs(path: Path) -> list[Run]:
    """Every measured run of a bench/plan_validate.py (any format) or bench/train_e2e.py JSON; one-line
    UserError for anything else. plan_validate.py's runs say their set; the older files' runs are all
    calibration. Kernel times per class come with format 3's runs whose profile succeeded."""
    data = _read_json(path)
    runs = data.get("runs") if isinstance(data, dict) else None
    if not isinstance(runs, dict) or "gpu" not in data:
        raise UserError(f"plan: --calibrate {path}: not a GPU benchmark of this project (expected the format of "
                        f"bench/plan_validate.py's or bench/train_e2e.py's output: a 'gpu' and 'runs'; or "
                        f"bench/mesh_runs.py's: runs with a layout each)")
    out = []
    for label, run in runs.items():
        if not isinstance(run, dict) or not isinstance(run.get("tokens_per_s"), (int, float)) or run["tokens_per_s"] <= 0:
            continue
        name, _, variant = label.partition("/")
        if "overrides" in run:
            overrides = list(run["overrides"])
        elif name in TRAIN_E2E_CONFIGS and variant == "after":
            overrides = list(TRAIN_E2E_CONFIGS[name])
        else:
            continue
        memory = run.get("measured_memory_gib", run.get("peak_memory_gib"))
        if memory is None and isinstance(run.get("measured"), dict):
            memory = run["measured"].get("peak_memory_gib")
        tokens = _tokens(overrides)
        measured = run.get("measured") if isinstance(run.get("measured"), dict) else {}
        out.append(Run(label, run.get("set", "calibration"), overrides, tokens / run["tokens_per_s"], memory,
                       _kernel_s(run) if data.get("format") in FIT_FORMATS else None,
                       bool(measured.get("cuda_graph", run.get("cuda_graph", False)))))
    if not out:
        raise UserError(f"plan: --calibrate {path}: no measured run (tokens_per_s) in it")
    return out


def _read_json(path: Path):
    try:
        return json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise UserError(f"plan: --calibrate {path}: no such file") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise UserError(f"plan: --calibrate {path}: not a JSON file ({exc.__class__.__name__})") from None


def _kernel_s(run: dict) -> dict[str, float] | None:
    classes = (run.get("profile") or {}).get("classes")
    if not isinstance(classes, dict) or set(classes) != set(KERNEL_CLASSES):
        return None  # the profile failed: the run has a step time only
    return {c: classes[c]["ms"] / 1e3 for c in KERNEL_CLASSES}


def _tokens(overrides: list[str]) -> int:
    from moemesh.config import load_config

    cfg = load_config("gpu", overrides)
    return cfg.train.global_batch * cfg.train.seq_len


def run_features(overrides: list[str], gpu: GPU, graphed: bool) -> dict[str, float]:
    """features() of a single-GPU run of the `gpu` preset with these overrides (layout (1, 1, 1))."""
    from moemesh.config import load_config
    from moemesh.parallel.layout import build_layout
    from moemesh.plan.memory import meta_model

    cfg = load_config("gpu", overrides)
    shape = shape_of(cfg, build_layout(meta_model(cfg.model), 1, 1, 1, False))
    return features(shape, 1, 1, 1, cfg.train.activation_checkpointing, gpu, 1.0, graphed)


def fit_runs(runs: list[Run], gpu: GPU, files: str = "") -> Constants:
    """One bounded least-squares problem per term: its constants against its measured class time over the
    runs, each run's residual relative to the run's step time (so a class's misfit counts as the share
    of the step it costs). Only runs with kernel times per class (format 3 and later) can be fitted. A launch
    mode without a run keeps the shipped idle pair (zeros would price its idle as nothing)."""
    import numpy as np

    runs = [r for r in runs if r.kernel_s is not None]
    if not runs:
        raise UserError(f"plan: --calibrate {files or 'runs'}: no calibration run with kernel times per class "
                        f"(the fit needs bench/plan_validate.py's format '{FIT_FORMAT}' or later; older files can only be "
                        f"evaluated, by bench/plan_report.py --constants shipped)")
    feats = [run_features(r.overrides, gpu, r.graphed) for r in runs]
    step = np.array([r.step_s for r in runs])
    values = {}
    for term in TERMS:
        names = [n for n, (t, _) in PARAMS.items() if t == term]
        a = np.array([[f[n] for n in names] for f in feats]) / step[:, None]
        y = np.array([r.term_s(term) for r in runs]) / step
        lower = np.array([LOWER[n] for n in names])
        values.update(zip(names, (lower + nnls(a, y - a @ lower)).tolist()))
    # single-GPU runs: none on a mesh
    values.update({name: getattr(H200_CONSTANTS, name) for name in (*MESH, *MESH_DEVICE)})
    for mode, names in IDLE_MODES.items():
        if not any(r.graphed == (mode == "graph") for r in runs):
            values.update({name: getattr(H200_CONSTANTS, name) for name in names})
    return Constants(**values, source=f"fitted to the calibration runs of {files}" if files else "fitted")


def nnls(a, y):
    """min |a x - y| subject to x >= 0 (Lawson-Hanson active set), on column-normalised a."""
    import numpy as np

    scale = np.linalg.norm(a, axis=0)
    scale[scale == 0] = 1.0
    a = a / scale
    n = a.shape[1]
    x, passive = np.zeros(n), np.zeros(n, dtype=bool)
    for _ in range(3 * n):
        w = a.T @ (y - a @ x)
        if passive.all() or (w[~passive] <= 1e-12).all():
            break
        passive[np.argmax(np.where(passive, -np.inf, w))] = True
        while True:
            z = np.zeros(n)
            z[passive] = np.linalg.lstsq(a[:, passive], y, rcond=None)[0]
            if (z[passive] > 0).all():
                x = z
                break
            neg = passive & (z <= 0)
            alpha = np.min(x[neg] / (x[neg] - z[neg]))
            x = x + alpha * (z - x)
            passive &= x > 1e-12
    return x / scale


def fit(paths, gpu: GPU | None = None) -> Constants:
    """The constants fitted to the calibration runs of one or more benchmark JSON files: bench/plan_validate.py's
    single-GPU runs fit every term (`fit_runs`), then bench/mesh_runs.py's multi-GPU runs, if any: those
    replayed as CUDA graphs at tp > 1 TP's collectives (`fit_tp`), those launched op by op the mesh's host
    constants and p (`fit_mesh`)."""
    paths = [Path(p) for p in ([paths] if isinstance(paths, (str, Path)) else paths)]
    gpu = gpu or GPUS["h200"]
    mesh = [p for p in paths if is_mesh_runs(p)]
    single = [p for p in paths if p not in mesh]
    constants = H200_CONSTANTS
    if single or not mesh:
        runs = [r for p in single for r in load_runs(p) if r.set == "calibration"]
        constants = fit_runs(runs, gpu, " + ".join(str(p) for p in single))
    if mesh:
        runs, files = [r for p in mesh for r in load_mesh_runs(p)], " + ".join(str(p) for p in mesh)
        multi = [r for r in runs if math.prod(r.layout) > 1]
        graphed_tp = [r for r in multi if r.graphed and r.layout[2] > 1]
        op_by_op = [r for r in multi if not r.graphed]
        if not graphed_tp and not op_by_op:
            raise UserError(f"plan: --calibrate {files}: no multi-GPU run launched op by op, and none replayed as "
                            f"a CUDA graph at tp > 1: nothing to fit the mesh's constants on")
        if graphed_tp:
            constants = fit_tp(graphed_tp, constants, gpu, files)
        if op_by_op:
            constants = fit_mesh(op_by_op, constants, gpu, files)
    return constants


# --- calibration of the mesh's host time on multi-GPU runs (bench/mesh_runs.py, bench/mesh_sweep.sh) ---

@dataclass
class MeshRun:
    label: str
    overrides: list[str]  # on the `gpu` preset, without the layout
    layout: tuple[int, int, int]
    sequence_parallel: bool
    recompute: str
    step_s: float  # measured: median step time, max over ranks
    memory_gib: float | None  # measured allocated peak, max over ranks
    steps_s: tuple[float, ...] = ()  # rank 0's timed steps after the warm-up ones (how much a step varies)
    # Its steps were replayed as one CUDA graph: recorded since session 6. Before, no multi-GPU step was
    # (False); a single-GPU run's is not known (None: as the planner assumes).
    graphed: bool | None = False


def is_mesh_runs(path: Path) -> bool:
    """Whether a benchmark JSON is bench/mesh_runs.py's output (its runs carry a layout)."""
    try:
        return _is_mesh_data(json.loads(Path(path).read_text()))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return False


def _is_mesh_data(data) -> bool:
    runs = data.get("runs") if isinstance(data, dict) else None
    return isinstance(runs, dict) and "launches" in data and all(isinstance(r, dict) and "layout" in r
                                                                for r in runs.values())


def load_mesh_runs(path: Path) -> list[MeshRun]:
    """The measured runs of a bench/mesh_runs.py JSON whose runs record their overrides."""
    data = _read_json(path)  # a missing or unreadable file says so
    if not _is_mesh_data(data):
        raise UserError(f"plan: --calibrate {path}: not bench/mesh_runs.py's output (runs with a layout each)")
    out, warmup = [], data.get("warmup") or 0
    for label, run in data["runs"].items():
        if not isinstance(run.get("step_ms"), (int, float)) or "overrides" not in run:
            continue
        graphed = run.get("cuda_graph", False if math.prod(run["layout"]) > 1 else None)
        out.append(MeshRun(label, list(run["overrides"]), tuple(run["layout"]), bool(run["sequence_parallel"]),
                           run["activation_checkpointing"], run["step_ms"] / 1e3, run.get("peak_gib"),
                           tuple(t / 1e3 for t in run.get("step_ms_all", [])[warmup:]), graphed))
    if not out:
        raise UserError(f"plan: --calibrate {path}: no measured run with its overrides in it (bench/mesh_runs.py "
                        f"records them since session 4)")
    return out


def mesh_run_terms(run: MeshRun, constants: Constants, gpu: GPU, gpus_per_node: int = 8) -> tuple[dict, dict]:
    """(the planner's terms in seconds, the features) of a measured multi-GPU run, at its own layout."""
    from moemesh.config import load_config
    from moemesh.parallel.layout import build_layout
    from moemesh.plan.memory import meta_model
    from moemesh.plan.search import IMBALANCE
    from moemesh.train.cuda_graph import planned

    dp, ep, tp = run.layout
    cfg = load_config("gpu", run.overrides)
    shape = shape_of(cfg, build_layout(meta_model(cfg.model), dp, ep, tp, run.sequence_parallel))
    graphed = planned(cfg, run.layout, gpu.capability) if run.graphed is None else run.graphed
    t, f = step_terms(shape, dp, ep, tp, run.recompute, gpu, gpus_per_node, IMBALANCE, constants, graphed)
    return t.terms, f


def fit_tp(runs: list[MeshRun], constants: Constants, gpu: GPU, files: str = "") -> Constants:
    """`tp_comm` fitted to multi-GPU steps replayed as one CUDA graph at tp > 1 (their time is the device's:
    no host term), every other constant as given: least squares of the relative step-time errors, which is
    linear in tp_comm (closed form), at least its lower bound."""
    runs = [r for r in runs if r.graphed and r.layout[2] > 1 and math.prod(r.layout) > 1]
    if not runs:
        raise UserError(f"plan: --calibrate {files or 'runs'}: no run replayed as a CUDA graph at tp > 1 to fit "
                        f"TP's collectives on")
    unit = dataclasses.replace(constants, tp_comm=1.0)
    num = den = 0.0
    for run in runs:
        terms, _ = mesh_run_terms(run, unit, gpu)
        t_tp, rest = terms["tp_allreduce"], sum(terms.values()) - terms["tp_allreduce"]
        num += t_tp * (run.step_s - rest) / run.step_s ** 2
        den += t_tp ** 2 / run.step_s ** 2
    value = max(num / den, LOWER["tp_comm"]) if den > 0 else constants.tp_comm
    source = (f"{constants.source}; TP's collectives fitted to the graphed tp > 1 runs of {files}" if files
              else constants.source)
    return dataclasses.replace(constants, tp_comm=value, source=source)


# p tried by `fit_mesh` before it narrows down on the best: 1 (host and device add up) to 8 (nearly the larger)
P_GRID = (1.0, 1.25, 1.5, 1.75, 2.0, 2.5, 3.0, 4.0, 6.0, 8.0)
# Runs whose misfit changes by less than this share over P_GRID cannot tell p: their steps are host (or
# device) alone, as a skeleton sweep's (1.8 %; the shipped calibration's: 140 %). p then stays as given.
P_SPREAD = 0.10


def fit_mesh(runs: list[MeshRun], constants: Constants, gpu: GPU, files: str = "") -> Constants:
    """The mesh's host constants and p (`MESH`) fitted to the measured step times of the multi-GPU runs
    launched op by op (a replayed CUDA graph's step has no host term), every other term as given: for each
    p, bounded nonlinear least squares of the relative step-time errors
    (`_fit_host`); p by a grid (P_GRID), then golden-section search around the grid's best, or as given
    when the runs cannot tell p (P_SPREAD)."""
    import numpy as np

    rows = []
    for run in (r for r in runs if math.prod(r.layout) > 1 and not r.graphed):
        terms, f = mesh_run_terms(run, constants, gpu)
        rows.append((sum(v for k, v in terms.items() if k != "idle"), [f[n] for n in MESH_HOST], run.step_s))
    if not rows:
        raise UserError(f"plan: --calibrate {files or 'runs'}: no multi-GPU run launched op by op (not a CUDA "
                        f"graph) to fit the mesh's host time on")
    device = np.array([r[0] for r in rows])
    feats = np.array([r[1] for r in rows])
    step = np.array([r[2] for r in rows])
    fits = {p: _fit_host(device, feats, step, p) for p in P_GRID}
    source = f"{constants.source}; mesh host fitted to the runs of {files}" if files else constants.source
    misfits = [fit[1] for fit in fits.values()]
    if max(misfits) <= (1 + P_SPREAD) * min(misfits):
        x, _ = _fit_host(device, feats, step, constants.mesh_overlap_p)
        return dataclasses.replace(constants, **dict(zip(MESH_HOST, x.tolist())), source=source)
    best = min(fits, key=lambda p: fits[p][1])
    i = P_GRID.index(best)
    lo, hi = P_GRID[max(i - 1, 0)], P_GRID[min(i + 1, len(P_GRID) - 1)]
    golden = (math.sqrt(5) - 1) / 2
    a, b = hi - golden * (hi - lo), lo + golden * (hi - lo)
    for p in (a, b):
        fits[p] = _fit_host(device, feats, step, p)
    while hi - lo > 1e-4:  # the surviving interior point is kept: one new fit per step
        if fits[a][1] <= fits[b][1]:
            hi, b = b, a
            a = hi - golden * (hi - lo)
            fits[a] = _fit_host(device, feats, step, a)
        else:
            lo, a = a, b
            b = lo + golden * (hi - lo)
            fits[b] = _fit_host(device, feats, step, b)
    best = min(fits, key=lambda p: fits[p][1])
    values = dict(zip(MESH_HOST, fits[best][0].tolist())) | {"mesh_overlap_p": best}
    return dataclasses.replace(constants, **values, source=source)


def _fit_host(device, feats, step, p: float, iterations: int = 200):
    """(host constants >= 0, their relative step-time misfit): min sum ((soft_max(device, feats @ x, p) -
    step) / step)^2 by projected Gauss-Newton (each step a bounded linear least-squares problem), halving
    a step that does not lower the misfit."""
    import numpy as np

    def predict(x):  # soft_max over arrays
        host = feats @ x
        top = np.maximum(np.maximum(device, host), 1e-12)
        return top * ((device / top) ** p + (host / top) ** p) ** (1 / p), host

    def misfit(x):
        return float(np.sum(((predict(x)[0] - step) / step) ** 2))

    x = nnls(feats / step[:, None], 1 - device / step)  # p = 1: host and device add up, a linear problem
    cost = misfit(x)
    for _ in range(iterations):
        pred, host = predict(x)
        # d pred / d host = (host / pred)^(p-1); the residuals relative to the step
        jac = ((np.maximum(host, 0) / pred) ** (p - 1))[:, None] * feats / step[:, None]
        target = nnls(jac, jac @ x - (pred - step) / step)
        t = 1.0
        while t > 1e-6:
            trial = x + t * (target - x)
            trial_cost = misfit(trial)
            if trial_cost < cost:
                break
            t /= 2
        if t <= 1e-6 or cost - trial_cost < 1e-15 * max(cost, 1e-30):
            break
        x, cost = trial, trial_cost
    return x, math.sqrt(cost / len(step))


def constants_dict(c: Constants) -> dict:
    return asdict(c)
