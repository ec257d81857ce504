"""Step-time cost model of one training step on one rank, and its calibration.

    t_step = t_gemm + t_attention + t_elementwise + t_optimizer + t_tp + t_ep + t_dp      (no overlap:
             the code runs every collective blocking, docs/design.md §11)

  t_gemm        matmul FLOPs / (peak * e_gemm * s(n)); s(n) = n / (n + N0) with n the smallest GEMM
                dim (rows per local expert, F/tp, D), so small, fine-grained GEMMs run slower (N0 from
                the two grouped-GEMM ceilings of ENV_NOTES: 724 TFLOP/s at n=4096, 527 at n=1408)
  t_attention   causal attention FLOPs / (peak * e_attn)
  t_elementwise c_elem * bytes of the activations the non-GEMM kernels touch / copy bandwidth
                (norms, rotary, SwiGLU, permutation and combine: T*D per layer plus K*T*D per MoE layer,
                T*V/tp at the head), so casts, gathers and scatters are priced by bytes
  t_optimizer   c_opt * local parameters / copy bandwidth (fused AdamW over fp32 masters, gradient casts,
                clipping, the copy back to bf16)
  t_tp          per layer 2 all-reduces forward + 2 backward of T*D bf16 (attention, FFN), 2 more at the
                embedding and head; ring time 2(n-1)/n * bytes / bus bandwidth (+ latency) on NVLink when
                tp <= GPUs per node, else on the inter-node link
  t_ep          per MoE layer 4 token all-to-alls (dispatch and combine, forward and backward) of
                K*T*D bf16 * imbalance, (n-1)/n of it leaves the rank; plus the count exchange's latency
                and host sync
  t_dp          fp32 gradient all-reduce: dense gradients over data x expert, expert gradients over data
Activation checkpointing adds the recomputed forward: 1/3 of the MoE GEMMs ("moe") or of the blocks'
GEMMs ("full") and their forward collectives. The four efficiency constants (e_gemm, e_attn, c_elem,
c_opt) are fitted to the project's benchmark JSON (`fit`), by least squares on relative error.
"""

from __future__ import annotations

import bisect
import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path

from moemesh.errors import UserError

E_ATTN = 0.45  # SDPA flash forward+backward, fraction of the matmul peak (assumed; not separable in the benches)
N0 = 1000.0  # GEMM size at which s(n) = 1/2; from 724 vs 527 TFLOP/s at n = 4096 vs 1408 (ENV_NOTES)
LATENCY_S = {"intra": 15e-6, "inter": 30e-6}  # per collective call
HOST_SYNC_S = 60e-6  # the EP count exchange's split sizes go to the host, once per MoE layer and pass


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
                "200 Gb/s IB assumed"),
}


@dataclass(frozen=True)
class Constants:
    e_gemm: float  # fraction of peak at s(n) = 1
    e_attn: float
    c_elem: float  # effective bytes moved per activation byte by non-GEMM kernels
    c_opt: float  # effective bytes moved per local parameter by the optimizer step
    source: str = ""


# Fitted by `fit` to bench/results/train_e2e.json (1 x H200, bf16 parameters + fp32 masters); see
# docs/planner.md. Regenerate with `moemesh plan ... --calibrate bench/results/train_e2e.json --json`.
H200_CONSTANTS = Constants(e_gemm=1.480, e_attn=E_ATTN, c_elem=64.40, c_opt=79.98,
                           source="fitted to bench/results/train_e2e.json (1 x H200)")


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
    """What the cost model needs of a (config, layout): counts per rank, all from the config and the
    placement table."""
    tokens: int  # T: tokens per data x expert coordinate
    dim: int
    ffn_dim: int
    top_k: int
    num_experts: int
    num_moe: int
    n_layers: int
    vocab: int
    seq_len: int
    dense_matmul_params: int  # attention, dense/shared MLP, router, head: full size
    local_params: int
    expert_local_params: int
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


def features(shape: Shape, dp: int, ep: int, tp: int, recompute: str, gpu: GPU, imbalance: float) -> dict[str, float]:
    """The step's work in units the constants multiply: seconds at e = 1 for GEMMs and attention,
    seconds at c = 1 for bytes. Linear in the constants, so `fit` is a least-squares problem."""
    s = shape
    peak = gpu.peak_tflops * 1e12
    bw = gpu.copy_gbs * 1e9
    rho = imbalance if ep > 1 else 1.0
    rows_per_expert = s.tokens * s.top_k * ep / s.num_experts * rho
    n = min(rows_per_expert, s.ffn_dim / tp, s.dim)
    expert_flops = 6 * s.tokens * s.top_k * 3 * s.dim * s.ffn_dim / tp * rho * s.num_moe
    dense_flops = 6 * s.tokens * s.dense_matmul_params / tp
    attn = 6 * s.tokens * s.seq_len * s.dim * s.n_layers / tp
    head_share = s.vocab * s.dim / max(s.dense_matmul_params, 1)
    extra = {"none": 0.0, "moe": expert_flops / 3,
             "full": (expert_flops + dense_flops * (1 - head_share) + attn) / 3}[recompute]
    n_dense = min(s.tokens, s.dim / tp * 4, s.dim)
    gemm = (expert_flops + (extra if recompute == "moe" else 0)) / (peak * n / (n + N0))
    gemm += (dense_flops + (extra if recompute == "full" else 0)) / (peak * n_dense / (n_dense + N0))
    act_bytes = 2 * s.tokens * (s.dim * s.n_layers + s.top_k * s.dim * s.num_moe * rho) + 4 * s.tokens * s.vocab / tp
    act_bytes *= {"none": 1.0, "moe": 1.15, "full": 1.33}[recompute]
    return {"gemm": gemm, "attention": attn / peak * (1.33 if recompute == "full" else 1.0),
            "elementwise": act_bytes / bw, "optimizer": s.local_params / bw}


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
              constants: Constants) -> StepTime:
    f = features(shape, dp, ep, tp, recompute, gpu, imbalance)
    terms = {"gemm": f["gemm"] / constants.e_gemm, "attention": f["attention"] / constants.e_attn,
             "elementwise": f["elementwise"] * constants.c_elem, "optimizer": f["optimizer"] * constants.c_opt}
    terms.update(comm_terms(shape, dp, ep, tp, recompute, gpu, gpus_per_node, imbalance))
    return StepTime(terms)


def shape_of(cfg, layout) -> Shape:
    m, t = cfg.model, cfg.train
    dense = local = expert_local = dense_grad = expert_grad = 0
    for name, placement in layout.params.items():
        numel = math.prod(layout.local_shape(name))
        local += numel
        if placement.expert:
            expert_local += numel
            expert_grad += numel
        else:
            dense_grad += numel
            if len(placement.full_shape) >= 2 and not name.startswith("tok_embeddings"):
                dense += math.prod(placement.full_shape)
    return Shape(tokens=t.global_batch // (layout.dp * layout.ep) * t.seq_len, dim=m.dim, ffn_dim=m.ffn_dim,
                 top_k=m.top_k, num_experts=m.num_experts, num_moe=m.n_layers - m.num_dense_layers,
                 n_layers=m.n_layers, vocab=m.vocab_size, seq_len=t.seq_len, dense_matmul_params=dense,
                 local_params=local, expert_local_params=expert_local, dense_grad_elems=dense_grad,
                 expert_grad_elems=expert_grad)


# --- calibration ---------------------------------------------------------------------------------------

# The configs of bench/train_e2e.py's labels (its JSON names runs by label only); a test keeps these
# equal to the script's CONFIGS. Only runs of the current code ("after") calibrate.
TRAIN_E2E_CONFIGS = {
    "gpu-preset": [],
    "mixtral-shaped": ["model.n_layers=2", "model.dim=4096", "model.ffn_dim=14336", "model.num_experts=8",
                       "model.top_k=2", "model.n_heads=32", "model.n_kv_heads=8", "model.vocab_size=32000",
                       "model.max_seq_len=4096", "train.seq_len=4096", "train.global_batch=4"],
    "fine-grained": ["model.n_layers=6", "model.dim=2048", "model.ffn_dim=1408", "model.num_experts=64",
                     "model.top_k=6", "model.n_heads=16", "model.n_kv_heads=4", "model.vocab_size=32000",
                     "model.max_seq_len=4096", "train.seq_len=4096", "train.global_batch=4"],
}


def calibration_runs(path: Path) -> list[tuple[str, list[str], float, dict | None]]:
    """(label, overrides on the `gpu` preset, measured step seconds, profile shares or None) of every
    usable run in a train_e2e.json or plan_validate.json; one-line UserError for anything else."""
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise UserError(f"plan: --calibrate {path}: no such file") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise UserError(f"plan: --calibrate {path}: not a JSON file ({exc.__class__.__name__})") from None
    runs = data.get("runs") if isinstance(data, dict) else None
    if not isinstance(runs, dict) or not data.get("gpu"):
        raise UserError(f"plan: --calibrate {path}: not a GPU benchmark of this project (expected the format of "
                        f"bench/results/train_e2e.json or bench/plan_validate.py's output: a 'gpu' and 'runs')")
    out = []
    for label, run in runs.items():
        if not isinstance(run, dict) or not isinstance(run.get("tokens_per_s"), (int, float)):
            continue
        name, _, variant = label.partition("/")
        if "overrides" in run:  # plan_validate.py records its configs
            overrides = list(run["overrides"])
        elif name in TRAIN_E2E_CONFIGS and variant == "after":
            overrides = list(TRAIN_E2E_CONFIGS[name])
        else:
            continue
        profile = runs.get(f"{name}/profile") if variant == "after" else None
        out.append((label, overrides, 0.0 if not run["tokens_per_s"] else 1.0 / run["tokens_per_s"],
                    profile if isinstance(profile, dict) and "share" in profile else None))
    if not out:
        raise UserError(f"plan: --calibrate {path}: no run of the current code with tokens_per_s in it")
    return out


def fit(path: Path) -> Constants:
    """Least squares on relative error: each run's step time (1/tokens_per_s x tokens per step), and
    where a profile exists its GEMM, optimizer and elementwise shares of the kernel time."""
    import numpy as np

    from moemesh.config import load_config
    from moemesh.model.transformer import Transformer
    from moemesh.parallel.layout import build_layout

    import torch

    rows, targets = [], []
    gpu = GPUS["h200"]
    for label, overrides, sec_per_token, profile in calibration_runs(path):
        cfg = load_config("gpu", overrides)
        with torch.device("meta"):
            model = Transformer(cfg.model)
        shape = shape_of(cfg, build_layout(model, 1, 1, 1, False))
        f = features(shape, 1, 1, 1, cfg.train.activation_checkpointing, gpu, 1.0)
        measured = sec_per_token * cfg.train.global_batch * cfg.train.seq_len
        rows.append([f["gemm"], f["attention"], f["elementwise"], f["optimizer"]])
        targets.append(measured)
        if profile:  # shares of kernel time over its 2 profiled steps, scaled to this run's step time
            share = profile["share"]
            busy = measured * (1 - profile.get("idle_frac", 0.0))
            rows.append([f["gemm"], f["attention"], 0, 0])
            targets.append(busy * share.get("gemm", 0) + busy * share.get("attention", 0))
            rows.append([0, 0, 0, f["optimizer"]])
            targets.append(busy * share.get("optimizer", 0))
            rows.append([0, 0, f["elementwise"], 0])
            targets.append(busy * (share.get("copy/cast", 0) + share.get("elementwise/other", 0)))
    # The benchmarks cannot separate attention from GEMMs (the profile files SDPA kernels under both),
    # so attention keeps a fixed efficiency (E_ATTN) and the other three constants are fitted.
    rows_, targets_ = np.array(rows), np.array(targets)
    rest = targets_ - rows_[:, 1] / E_ATTN
    a = rows_[:, [0, 2, 3]] / targets_[:, None]
    x, *_ = np.linalg.lstsq(a, rest / targets_, rcond=None)
    x = np.maximum(x, 1e-3)  # a negative coefficient would mean the data cannot tell the term apart
    return Constants(e_gemm=float(1 / x[0]), e_attn=E_ATTN, c_elem=float(x[1]), c_opt=float(x[2]),
                     source=f"fitted to {path}")


def constants_dict(c: Constants) -> dict:
    return asdict(c)
