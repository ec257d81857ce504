"""Step-time cost model of one training step on one rank, and its calibration.

    t_step = t_gemm + t_attention + t_elementwise + t_head + t_optimizer + t_launch + t_tp + t_ep + t_dp
             (no overlap counted: the gradient all-reduce overlaps the backward pass by default
             (parallel.overlap_grad_reduce) and the expert all-to-all can (ep_overlap_chunks), but how much
             is unmeasured on GPUs, so t_dp and t_ep are added in full: an upper bound)

  t_gemm        sum over GEMM classes of FLOPs / peak * (gemm_a + gemm_b * N0 / n): the inverse of a
                shape-dependent efficiency e(n) = n / (gemm_a * n + gemm_b * N0), n the class's smallest GEMM
                dim (rows per local expert, F/tp, D; tokens, D; tokens, V/tp, D), N0 = 1000. The fit keeps
                gemm_a >= 1 and gemm_b >= 0, so no GEMM runs above the measured matmul peak.
  t_attention   causal attention FLOPs / peak * c_attn (c_attn >= 1: flash attention below the matmul peak)
  t_elementwise c_elem * bytes of the activations the non-GEMM kernels touch / copy bandwidth (norms,
                rotary, SwiGLU, permutation and combine: T*D per layer plus K*T*D per MoE layer)
  t_head        c_head * the fp32 logits' bytes (4*T*V/tp) / copy bandwidth: the logits' cast, the
                cross-entropy's log-softmax and its backward; its own constant, since they move a different
                number of bytes per byte than the layers' kernels
  t_optimizer   c_opt * local parameters / copy bandwidth (the AdamW step over fp32 masters, gradient casts,
                clipping, the copy back to bf16)
  t_launch      c_layer * layers * 1 ms: per-layer fixed cost (kernel launches, host work) that no byte or
                FLOP count sees
  t_tp          per layer 2 all-reduces forward + 2 backward of T*D bf16 (attention, FFN), 2 more at the
                embedding and head; ring time 2(n-1)/n * bytes / bus bandwidth (+ latency) on NVLink when
                tp <= GPUs per node, else on the inter-node link
  t_ep          per MoE layer 4 token all-to-alls (dispatch and combine, forward and backward) of
                K*T*D bf16 * imbalance, (n-1)/n of it leaves the rank; plus the count exchange's latency
                and host sync
  t_dp          fp32 gradient all-reduce: dense gradients over data x expert, expert gradients over data
Activation checkpointing adds the recomputed forward: 1/3 of the MoE layers' GEMMs and elementwise bytes
("moe") or of the blocks' ("full"), and their forward collectives. The model is linear in its seven
constants, so `fit` is a (bounded) least-squares problem on relative error.
"""

from __future__ import annotations

import bisect
import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path

from moemesh.errors import UserError

N0 = 1000.0  # GEMM size scale of the efficiency curve
N_MIN = 128  # smaller GEMM dims (the router's E columns) count as this: they are latency, not throughput
LATENCY_S = {"intra": 15e-6, "inter": 30e-6}  # per collective call
HOST_SYNC_S = 60e-6  # the EP count exchange's split sizes go to the host, once per MoE layer and pass
TERMS = ("gemm", "attention", "elementwise", "head", "optimizer", "launch")


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
    gemm_a: float  # 1 / efficiency of large GEMMs (>= 1)
    gemm_b: float  # how fast efficiency falls with the smallest GEMM dim (>= 0)
    c_attn: float  # 1 / efficiency of flash attention (>= 1)
    c_elem: float  # effective bytes moved per activation byte by non-GEMM kernels
    c_head: float  # effective bytes moved per fp32 logit byte (cast, log-softmax, cross-entropy, backward)
    c_opt: float  # effective bytes moved per local parameter by the optimizer step
    c_layer: float  # ms per layer per step of fixed cost
    source: str = ""

    def gemm_efficiency(self, n: float) -> float:
        return n / (self.gemm_a * n + self.gemm_b * N0)


# Fitted by `fit` to the 16 calibration configs of bench/results/plan_validate_v2.json (1 x H200, the current
# code: one-pass master step, gather dispatch); its 13 held-out configs are not used. docs/planner.md has
# both tables. Some fitted values are not physical (c_opt is below the 28 bytes per parameter the optimizer
# step moves; c_attn puts attention at ~11 % of peak; 5 ms per layer): the terms trade off against each
# other, and the model is missing whatever makes long-sequence and small-expert configs slow.
# Regenerate with `moemesh plan gpu --gpus 1 --calibrate FILE --json`.
H200_CONSTANTS = Constants(gemm_a=1.1997, gemm_b=0.0, c_attn=9.422, c_elem=50.95, c_head=12.71, c_opt=7.893,
                           c_layer=5.101, source="fitted to bench/results/plan_validate_v2.json (1 x H200)")


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
    """The step's work in the units the constants multiply (seconds at constant 1), linear in them:
    gemm (x gemm_a), gemm_small (x gemm_b), attention (x c_attn), elementwise (x c_elem), head (x c_head),
    optimizer (x c_opt), launch (x c_layer)."""
    s = shape
    peak = gpu.peak_tflops * 1e12
    bw = gpu.copy_gbs * 1e9
    rho = imbalance if ep > 1 else 1.0
    again = 1 / 3  # a recomputed forward: a third of forward + backward
    moe_again = again if recompute in ("moe", "full") else 0.0
    block_again = again if recompute == "full" else 0.0
    rows_per_expert = s.tokens * s.top_k * ep / s.num_experts * rho
    n_dense = max(min(s.tokens, s.dim // tp, s.dim), N_MIN)
    classes = [  # (training FLOPs, smallest dim): experts, attention projections + dense/shared MLPs, router, head
        (6 * s.tokens * s.top_k * 3 * s.dim * s.ffn_dim / tp * rho * s.num_moe * (1 + moe_again),
         max(min(rows_per_expert, s.ffn_dim / tp, s.dim), N_MIN)),
        (6 * s.tokens * (s.attn_params * s.n_layers + s.dense_ffn_params * (s.n_layers - s.num_moe)) / tp
         * (1 + block_again) + 6 * s.tokens * s.shared_params * s.num_moe / tp * (1 + moe_again), n_dense),
        (6 * s.tokens * s.dim * s.num_experts * s.num_moe * (1 + moe_again), N_MIN),
        (6 * s.tokens * s.vocab * s.dim / tp, max(min(s.tokens, s.vocab // tp, s.dim), N_MIN)),
    ]
    attn = 6 * s.tokens * s.seq_len * s.dim * s.n_layers / tp * (1 + block_again)
    layer_bytes = 2 * s.tokens * s.dim * s.n_layers * (1 + block_again)
    moe_bytes = 2 * s.tokens * s.top_k * s.dim * s.num_moe * rho * (1 + moe_again)
    return {"gemm": sum(f for f, _ in classes) / peak, "gemm_small": sum(f * N0 / n for f, n in classes) / peak,
            "attention": attn / peak, "elementwise": (layer_bytes + moe_bytes) / bw,
            "head": 4 * s.tokens * s.vocab / tp / bw, "optimizer": s.local_params / bw, "launch": s.n_layers * 1e-3}


def compute_terms(f: dict[str, float], c: Constants) -> dict[str, float]:
    return {"gemm": f["gemm"] * c.gemm_a + f["gemm_small"] * c.gemm_b, "attention": f["attention"] * c.c_attn,
            "elementwise": f["elementwise"] * c.c_elem, "head": f["head"] * c.c_head,
            "optimizer": f["optimizer"] * c.c_opt, "launch": f["launch"] * c.c_layer}


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
    terms = compute_terms(features(shape, dp, ep, tp, recompute, gpu, imbalance), constants)
    terms.update(comm_terms(shape, dp, ep, tp, recompute, gpu, gpus_per_node, imbalance))
    return StepTime(terms)


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
                 local_params=counts.local, dense_grad_elems=counts.dense_grad,
                 expert_grad_elems=counts.expert_local)


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
LOWER = {"gemm_a": 1.0, "gemm_b": 0.0, "c_attn": 1.0, "c_elem": 0.0, "c_head": 0.0, "c_opt": 0.0, "c_layer": 0.0}
COLUMNS = {"gemm_a": "gemm", "gemm_b": "gemm_small", "c_attn": "attention", "c_elem": "elementwise",
           "c_head": "head", "c_opt": "optimizer", "c_layer": "launch"}


@dataclass
class Run:
    label: str
    set: str  # "calibration" or "heldout"
    overrides: list[str]  # on the `gpu` preset
    step_s: float  # measured
    memory_gib: float | None  # measured torch.cuda.max_memory_allocated


def load_runs(path: Path) -> list[Run]:
    """Every measured run of a bench/plan_validate.py or bench/train_e2e.py JSON; one-line UserError for
    anything else. plan_validate.py's runs say their set; the older files' runs are all calibration (the
    13 configs of the first plan_validate.json and train_e2e.py's three are the calibration list)."""
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise UserError(f"plan: --calibrate {path}: no such file") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise UserError(f"plan: --calibrate {path}: not a JSON file ({exc.__class__.__name__})") from None
    runs = data.get("runs") if isinstance(data, dict) else None
    if not isinstance(runs, dict) or "gpu" not in data:
        raise UserError(f"plan: --calibrate {path}: not a GPU benchmark of this project (expected the format of "
                        f"bench/plan_validate.py's or bench/train_e2e.py's output: a 'gpu' and 'runs')")
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
        out.append(Run(label, run.get("set", "calibration"), overrides, tokens / run["tokens_per_s"], memory))
    if not out:
        raise UserError(f"plan: --calibrate {path}: no measured run (tokens_per_s) in it")
    return out


def _tokens(overrides: list[str]) -> int:
    from moemesh.config import load_config

    cfg = load_config("gpu", overrides)
    return cfg.train.global_batch * cfg.train.seq_len


def run_features(overrides: list[str], gpu: GPU) -> dict[str, float]:
    """features() of a single-GPU run of the `gpu` preset with these overrides (layout (1, 1, 1))."""
    from moemesh.config import load_config
    from moemesh.parallel.layout import build_layout
    from moemesh.plan.memory import meta_model

    cfg = load_config("gpu", overrides)
    shape = shape_of(cfg, build_layout(meta_model(cfg.model), 1, 1, 1, False))
    return features(shape, 1, 1, 1, cfg.train.activation_checkpointing, gpu, 1.0)


def fit_runs(runs: list[Run], gpu: GPU, source: str = "") -> Constants:
    """Least squares on relative error, bounded: gemm_a, c_attn >= 1, the rest >= 0."""
    import numpy as np

    if not runs:
        raise UserError("plan: --calibrate: no calibration run in the file(s)")
    names = list(COLUMNS)
    feats = [run_features(r.overrides, gpu) for r in runs]
    a = np.array([[f[COLUMNS[n]] for n in names] for f in feats])
    t = np.array([r.step_s for r in runs])
    lower = np.array([LOWER[n] for n in names])
    a_rel = a / t[:, None]
    x = lower + nnls(a_rel, 1.0 - a_rel @ lower)
    return Constants(**{n: float(v) for n, v in zip(names, x)}, source=source)


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
    """The constants fitted to the calibration runs of one or more benchmark JSON files."""
    paths = [Path(p) for p in ([paths] if isinstance(paths, (str, Path)) else paths)]
    runs = [r for p in paths for r in load_runs(p) if r.set == "calibration"]
    return fit_runs(runs, gpu or GPUS["h200"], source="fitted to " + " + ".join(str(p) for p in paths))


def constants_dict(c: Constants) -> dict:
    return asdict(c)
