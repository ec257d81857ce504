"""The MoE layer alone on one GPU (issue 7, benchmark a): moemesh vs torchtitan 0.3.0 vs torch._grouped_mm.

One process, one call. Two shapes, 16k tokens (4 x 4096), forward + backward:
  mixtral       dim 4096, ffn 14336, 8 experts, top-2
  fine_grained  dim 2048, ffn 1408, 64 experts, top-6
Cases (same weights, same input, same routing in each (shape, routing) cell):
  gmm_only           three torch._grouped_mm + silu*mul on rows already permuted by expert, bf16, weights
                     stored (E, D, F) as moemesh stores them: the ceiling for the expert computation;
  gmm_only_t         the same with weights stored (E, F, D) and passed transposed, as torchtitan does;
  gmm_only_fused_act gmm_only with silu*mul as moemesh's one-kernel activation (moemesh.kernels.swiglu): the
                     ceiling for the activation moemesh trains with on a GPU;
  moemesh_fp32_amp   moemesh.model.moe.MoE as it trains today: fp32 parameters, fp32 input (the residual
                     stream), bf16 autocast; aux + z losses in the backward (coefficients 0.01 / 0.001);
  moemesh_bf16       the same module with bf16 parameters and a bf16 input, no autocast;
  moemesh_bf16_fused the same with train.fused_kernels' Triton kernels (activation, combine, gather backward):
                     the MoE layer as the Trainer runs it on a GPU;
  torchtitan_fp32_amp  torchtitan.models.common.moe.MoE (softmax router, route_norm, no shared expert,
                     LocalTokenDispatcher, its default torch._grouped_mm path), fp32 params + bf16 autocast
                     (how torchtitan trains on one GPU without FSDP);
  torchtitan_bf16    the same with bf16 parameters and input (what it computes on under FSDP's bf16
                     param_dtype).
Routing:
  natural   softmax top-k of a random gate (N(0, 0.02)) on inputs N(0, 1) plus a direction shared by all
            tokens (x 0.3, as hidden states share a mean), which skews the load like a learned router
            (max/mean expert load is recorded);
  balanced  every implementation routes (token t, choice k) to expert (t*K + k) mod E: exactly T*K/E rows
            per expert (torchtitan: its own `_debug_force_load_balance`, which does exactly this; moemesh:
            the router output is overridden the same way after the router runs).
FLOPs counted: the expert GEMMs only, 3 GEMMs x 2*T*K*D*F forward, x3 for forward+backward = 18*T*K*D*F
(router gate, softmax, permutation and combine not counted). Time: CUDA events around each iteration
(grads set to None, forward, backward), warm-up then timed iterations, median; every case is run in two
passes interleaved with the others, and both pass medians are kept. Peak memory: max allocated during the
timed iterations minus what was allocated before the case was built (shared input and master weights).

Usage (device):  PYTHONPATH=src python3 bench/moe_layer.py --out $OUT
Usage (CPU dry run of the plumbing, tiny shapes):  PYTHONPATH=src python bench/moe_layer.py --cpu-dry-run --out /tmp/x
Writes moe_layer.json under --out.

Legend: T tokens, D model dim, F expert hidden dim, E experts, K top-k, R routed rows (T*K).
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import gc
import json
import os
import statistics
import sys
import time
import traceback
import warnings
from pathlib import Path

import torch
import torch.nn.functional as F

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "src"))

from moemesh import kernels  # noqa: E402
from moemesh.kernels.swiglu import swiglu  # noqa: E402
from moemesh.model.moe import MoE, Routing  # noqa: E402
from moemesh.train.fused_kernels import apply_fused_kernels  # noqa: E402

SHAPES = {
    "mixtral": dict(dim=4096, ffn_dim=14336, num_experts=8, top_k=2),
    "fine_grained": dict(dim=2048, ffn_dim=1408, num_experts=64, top_k=6),
}
DRY_SHAPES = {
    "mixtral": dict(dim=64, ffn_dim=128, num_experts=8, top_k=2),
    "fine_grained": dict(dim=32, ffn_dim=48, num_experts=16, top_k=4),
}
CASES = ["gmm_only", "gmm_only_t", "gmm_only_fused_act", "moemesh_fp32_amp", "moemesh_bf16", "moemesh_bf16_fused",
         "torchtitan_fp32_amp", "torchtitan_bf16"]
FUSED_CASES = ("gmm_only_fused_act", "moemesh_bf16_fused")  # run only where the Triton kernels run
AUX_COEF, Z_COEF = 0.01, 0.001  # moemesh's config defaults (model.aux_loss_coef / z_loss_coef)
SHARED_DIRECTION_SCALE = 0.3
GATE_STD, EXPERT_STD = 0.02, 0.02


# ---------------------------------------------------------------------------------------------------
# torchtitan

def import_torchtitan():
    """torchtitan 0.3.0's MoE module. Its EP code calls torch.compiler._is_non_strict_tracing, which
    torch 2.11 lacks; the local path used here does not, but shim it so any call fails safe."""
    if not hasattr(torch.compiler, "_is_non_strict_tracing"):
        torch.compiler._is_non_strict_tracing = lambda: False
    from torchtitan.models.common import moe as tt_moe
    from torchtitan.models.common.linear import Linear
    from torchtitan.models.common.token_dispatcher import LocalTokenDispatcher
    return tt_moe, Linear, LocalTokenDispatcher


def build_torchtitan(shape: dict, balanced: bool):
    tt_moe, Linear, LocalTokenDispatcher = import_torchtitan()
    D, F_, E, K = shape["dim"], shape["ffn_dim"], shape["num_experts"], shape["top_k"]
    cfg = tt_moe.MoE.Config(
        num_experts=E,
        load_balance_coeff=1e-3,  # its default: aux-loss-free bias buffer (zeros here), no aux loss
        router=tt_moe.TokenChoiceTopKRouter.Config(
            num_experts=E, gate=Linear.Config(in_features=D, out_features=E, bias=False), top_k=K,
            score_func="softmax", route_norm=True, _debug_force_load_balance=balanced),
        routed_experts=tt_moe.RoutedExperts.Config(
            inner_experts=tt_moe.GroupedExperts.Config(dim=D, hidden_dim=F_, num_experts=E),
            token_dispatcher=LocalTokenDispatcher.Config(num_experts=E, top_k=K)),
        shared_experts=None,
    )
    return cfg.build()


# ---------------------------------------------------------------------------------------------------
# weights, inputs, routing

def make_master(shape: dict, tokens: int, device: str, seed: int) -> dict:
    D, F_, E = shape["dim"], shape["ffn_dim"], shape["num_experts"]
    gen = torch.Generator(device=device).manual_seed(seed)

    def randn(*size, std=1.0):
        return torch.randn(*size, device=device, generator=gen) * std

    x_TD = randn(tokens, D) + SHARED_DIRECTION_SCALE * randn(D)
    return {
        "gate_ED": randn(E, D, std=GATE_STD),
        "w1_EDF": randn(E, D, F_, std=EXPERT_STD).bfloat16(),
        "w3_EDF": randn(E, D, F_, std=EXPERT_STD).bfloat16(),
        "w2_EFD": randn(E, F_, D, std=EXPERT_STD).bfloat16(),
        "x_TD": x_TD,  # fp32
        "g_TD": randn(tokens, D).bfloat16(),  # incoming gradient of the layer output
    }


def balanced_ids(num_tokens: int, top_k: int, num_experts: int, device) -> torch.Tensor:
    return (torch.arange(num_tokens * top_k, device=device) % num_experts).view(num_tokens, top_k)


def routing_counts(master: dict, shape: dict, balanced: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """(order_R, counts_E) of the routing, for the grouped-GEMM-only cases."""
    E, K = shape["num_experts"], shape["top_k"]
    x = master["x_TD"]
    if balanced:
        ids_TK = balanced_ids(x.shape[0], K, E, x.device)
    else:
        ids_TK = (x @ master["gate_ED"].T).softmax(-1).topk(K, dim=-1).indices
    flat = ids_TK.reshape(-1)
    return torch.argsort(flat, stable=True), torch.bincount(flat, minlength=E)


# ---------------------------------------------------------------------------------------------------
# cases: each builder returns (step, forward_output, n_params_bytes); step() runs forward + backward

def build_gmm_only(master, shape, balanced, transposed: bool, activation=None):
    K = shape["top_k"]
    order_R, counts_E = routing_counts(master, shape, balanced)
    offsets_E = torch.cumsum(counts_E, 0).to(torch.int32)
    x_RD = master["x_TD"][order_R // K].bfloat16().requires_grad_(True)
    g_RD = master["g_TD"][order_R // K].contiguous()
    if transposed:  # stored (E, F, D) / (E, D, F) as torchtitan does, passed as transposed views
        ws = [master[n].transpose(1, 2).contiguous().requires_grad_(True) for n in ("w1_EDF", "w3_EDF", "w2_EFD")]
        view = lambda w: w.transpose(-2, -1)  # noqa: E731
    else:
        ws = [master[n].clone().requires_grad_(True) for n in ("w1_EDF", "w3_EDF", "w2_EFD")]
        view = lambda w: w  # noqa: E731
    w1, w3, w2 = ws

    act = activation or (lambda g, u: F.silu(g) * u)

    def forward():
        h_RF = act(torch._grouped_mm(x_RD, view(w1), offs=offsets_E), torch._grouped_mm(x_RD, view(w3), offs=offsets_E))
        return torch._grouped_mm(h_RF, view(w2), offs=offsets_E)

    def step():
        x_RD.grad = None
        for w in ws:
            w.grad = None
        y = forward()
        y.backward(g_RD)
        return y

    return step, sum(w.numel() * w.element_size() for w in ws), {"counts_E": counts_E.tolist()}


def _balanced_router(router, num_experts: int):
    """Wrap moemesh's Router: run it (so its cost counts), then route (t, k) to (t*K + k) mod E."""
    original = router.forward

    def forward(x_TD):
        r = original(x_TD)
        ids_TK = balanced_ids(r.experts_TK.shape[0], r.experts_TK.shape[1], num_experts, x_TD.device)
        w_TK = r.probs_TE.gather(1, ids_TK)
        return Routing(w_TK / w_TK.sum(dim=-1, keepdim=True), ids_TK, r.probs_TE, r.logits_TE)

    router.forward = forward


def build_moemesh(master, shape, balanced, param_dtype, amp_dtype, x_dtype, device, fused=False):
    B, S = master["batch_shape"]
    with torch.device(device):
        moe = MoE(**shape)
    apply_fused_kernels(moe, fused)  # as the Trainer does on a GPU (train.fused_kernels)
    with torch.no_grad():
        moe.router.gate.weight.copy_(master["gate_ED"])
        moe.experts.w1_EDF.copy_(master["w1_EDF"])
        moe.experts.w3_EDF.copy_(master["w3_EDF"])
        moe.experts.w2_EFD.copy_(master["w2_EFD"])
    moe.to(param_dtype).train()
    if balanced:
        _balanced_router(moe.router, shape["num_experts"])
    x = master["x_TD"].to(x_dtype).view(B, S, -1).requires_grad_(True)
    g = master["g_TD"].to(x_dtype).view(B, S, -1)
    ctx = (lambda: torch.autocast(device, dtype=amp_dtype)) if amp_dtype else contextlib.nullcontext
    params = list(moe.parameters())

    def step():
        x.grad = None
        for p in params:
            p.grad = None
        with ctx():
            y, aux, z = moe(x)
            loss_extra = AUX_COEF * aux + Z_COEF * z
        torch.autograd.backward([y, loss_extra], [g, None])
        return y

    return step, sum(p.numel() * p.element_size() for p in params), {"module": moe}


def build_torchtitan_case(master, shape, balanced, param_dtype, amp_dtype, x_dtype, device):
    B, S = master["batch_shape"]
    with torch.device(device):
        moe = build_torchtitan(shape, balanced)
    inner = moe.routed_experts.inner_experts
    with torch.no_grad():
        moe.router.gate.weight.copy_(master["gate_ED"])
        inner.w1_EFD.copy_(master["w1_EDF"].transpose(1, 2))
        inner.w3_EFD.copy_(master["w3_EDF"].transpose(1, 2))
        inner.w2_EDF.copy_(master["w2_EFD"].transpose(1, 2))
        moe.expert_bias_E.zero_()
        moe.tokens_per_expert_E.zero_()
    moe.to(param_dtype).train()
    moe.expert_bias_E.data = moe.expert_bias_E.float()
    moe.tokens_per_expert_E.data = moe.tokens_per_expert_E.float()
    x = master["x_TD"].to(x_dtype).view(B, S, -1).requires_grad_(True)
    g = master["g_TD"].to(x_dtype).view(B, S, -1)
    ctx = (lambda: torch.autocast(device, dtype=amp_dtype)) if amp_dtype else contextlib.nullcontext
    params = list(moe.parameters())

    def step():
        x.grad = None
        for p in params:
            p.grad = None
        with ctx():
            y = moe(x)
        y.backward(g)
        return y

    return step, sum(p.numel() * p.element_size() for p in params), {"module": moe}


def build_case(name, master, shape, balanced, device, low):
    amp = low if low != torch.float32 else None  # dry run: no autocast to fp32
    if name == "gmm_only":
        return build_gmm_only(master, shape, balanced, transposed=False)
    if name == "gmm_only_t":
        return build_gmm_only(master, shape, balanced, transposed=True)
    if name == "gmm_only_fused_act":
        return build_gmm_only(master, shape, balanced, transposed=False, activation=swiglu)
    if name == "moemesh_fp32_amp":
        return build_moemesh(master, shape, balanced, torch.float32, amp, torch.float32, device)
    if name == "moemesh_bf16":
        return build_moemesh(master, shape, balanced, low, None, low, device)
    if name == "moemesh_bf16_fused":
        return build_moemesh(master, shape, balanced, low, None, low, device, fused=True)
    if name == "torchtitan_fp32_amp":
        return build_torchtitan_case(master, shape, balanced, torch.float32, amp, torch.float32, device)
    if name == "torchtitan_bf16":
        return build_torchtitan_case(master, shape, balanced, low, None, low, device)
    raise ValueError(name)


# ---------------------------------------------------------------------------------------------------
# timing, memory, syncs, profile

def sync(device):
    if device == "cuda":
        torch.cuda.synchronize()


def time_iters(step, device, warmup: int, iters: int) -> list[float]:
    for _ in range(warmup):
        step()
    sync(device)
    times = []
    if device == "cuda":
        events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(iters)]
        for start, end in events:
            start.record()
            step()
            end.record()
        torch.cuda.synchronize()
        times = [s.elapsed_time(e) for s, e in events]
    else:
        for _ in range(iters):
            t0 = time.perf_counter()
            step()
            times.append(1000 * (time.perf_counter() - t0))
    return times


def count_syncs(step, device) -> int | None:
    """Host syncs in one forward+backward, as torch.cuda.set_sync_debug_mode('warn') reports them."""
    if device != "cuda":
        return None
    torch.cuda.synchronize()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            step()
        finally:
            torch.cuda.set_sync_debug_mode(0)
    torch.cuda.synchronize()
    return sum(1 for w in caught if "synchroniz" in str(w.message).lower())


def kernel_category(name: str) -> str:
    n = name.lower()
    if "grouped" in n or "group" in n and ("cutlass" in n or "gemm" in n):
        return "grouped_gemm"
    if any(s in n for s in ("gemm", "cutlass", "nvjet", "xmma", "sm90_")):
        return "dense_gemm"
    if "sort" in n or "radix" in n or "scan" in n:
        return "sort_scan"
    if "index" in n or "scatter" in n or "gather" in n:
        return "index_scatter_gather"
    if "reduce" in n:
        return "reduce"
    if "copy" in n or "cast" in n or "convert" in n:
        return "copy_cast"
    return "elementwise_other"


def profile_case(step, device, iters: int = 3) -> dict:
    """Kernel time per iteration by kernel (top 15) and by category, CPU+CUDA activities."""
    acts = [torch.profiler.ProfilerActivity.CPU]
    if device == "cuda":
        acts.append(torch.profiler.ProfilerActivity.CUDA)
    sync(device)
    with torch.profiler.profile(activities=acts) as prof:
        for _ in range(iters):
            step()
        sync(device)
    by_name: dict[str, float] = {}
    want = torch.autograd.DeviceType.CUDA if device == "cuda" else torch.autograd.DeviceType.CPU
    for e in prof.events():
        if e.device_type != want:
            continue
        if device == "cuda":
            us = e.time_range.elapsed_us()
        else:
            us = e.self_cpu_time_total
        by_name[e.name] = by_name.get(e.name, 0.0) + us
    by_cat: dict[str, float] = {}
    for name, us in by_name.items():
        cat = kernel_category(name)
        by_cat[cat] = by_cat.get(cat, 0.0) + us
    top = sorted(by_name.items(), key=lambda kv: -kv[1])[:15]
    return {
        "kernel_ms_per_iter": round(sum(by_name.values()) / iters / 1000, 3),
        "by_category_ms": {k: round(v / iters / 1000, 3) for k, v in sorted(by_cat.items(), key=lambda kv: -kv[1])},
        "top_kernels_ms": [[n[:160], round(us / iters / 1000, 3)] for n, us in top],
        "num_kernels_per_iter": round(sum(1 for e in prof.events() if e.device_type == want) / iters, 1),
    }


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach().double(), b.detach().double()
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


def run_case(name, master, shape, balanced, device, low, warmup, iters, profile: bool) -> tuple[dict, torch.Tensor | None]:
    gc.collect()
    if device == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
    step, param_bytes, extra = build_case(name, master, shape, balanced, device, low)
    out: dict = {"param_gib": round(param_bytes / 2**30, 3)}
    if "counts_E" in extra:
        out["counts_E"] = extra["counts_E"]
    y_first = step().detach().float()  # first call: compile/handles; kept for the cross-check
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    times = time_iters(step, device, warmup, iters)
    if device == "cuda":
        out["peak_gib"] = round((torch.cuda.max_memory_allocated() - base) / 2**30, 2)
    out["times_ms"] = [round(t, 3) for t in times]
    out["median_ms"] = round(statistics.median(times), 3)
    out["host_syncs_per_iter"] = count_syncs(step, device)
    if profile:
        try:
            out["profile"] = profile_case(step, device)
        except Exception:
            out["profile_error"] = traceback.format_exc()[-2000:]
    del step, extra
    return out, y_first


# ---------------------------------------------------------------------------------------------------

def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=os.environ.get("OUT", "/tmp/moe_layer_out"))
    ap.add_argument("--cpu-dry-run", action="store_true", help="tiny shapes on CPU, fp32: plumbing only")
    ap.add_argument("--warmup", type=int, default=None)
    ap.add_argument("--iters", type=int, default=None)
    ap.add_argument("--passes", type=int, default=2)
    ap.add_argument("--shapes", default=",".join(SHAPES))
    ap.add_argument("--no-profile", action="store_true")
    args = ap.parse_args()

    dry = args.cpu_dry_run
    device = "cpu" if dry else "cuda"
    low = torch.float32 if dry else torch.bfloat16
    shapes = DRY_SHAPES if dry else SHAPES
    batch_shape = (2, 64) if dry else (4, 4096)
    warmup = args.warmup if args.warmup is not None else (1 if dry else 5)
    iters = args.iters if args.iters is not None else (2 if dry else 25)
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    tokens = batch_shape[0] * batch_shape[1]

    report: dict = {
        "command": " ".join(["python3"] + sys.argv),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "dry_run": dry, "torch": torch.__version__, "python": sys.version.split()[0],
        "batch_shape": list(batch_shape), "tokens": tokens, "warmup": warmup, "iters": iters,
        "passes": args.passes, "compute_dtype": str(low).replace("torch.", ""),
        "flops_formula": "expert GEMMs only: 3 GEMMs x 2*T*K*D*F forward, x3 forward+backward = 18*T*K*D*F",
        "natural_routing": f"softmax top-k of gate N(0,{GATE_STD}) on x = N(0,1) + {SHARED_DIRECTION_SCALE} * "
                           "shared N(0,1) direction",
        "balanced_routing": "(token t, choice k) -> expert (t*K + k) mod E, after the router runs",
        "aux_z_coef_moemesh": [AUX_COEF, Z_COEF],
        "errors": [], "results": {},
    }
    if not dry:
        assert torch.cuda.is_available(), "CUDA is not available"
        props = torch.cuda.get_device_properties(0)
        report.update(gpu=torch.cuda.get_device_name(0), capability=list(torch.cuda.get_device_capability(0)),
                      gpu_mem_gib=round(props.total_memory / 2**30, 1), sms=props.multi_processor_count,
                      cuda=torch.version.cuda)
    try:
        import torchtitan
        report["torchtitan"] = getattr(torchtitan, "__version__", None) or _dist_version("torchtitan")
        report["torchtitan_file"] = torchtitan.__file__
    except Exception:
        report["errors"].append("import torchtitan: " + traceback.format_exc()[-1500:])
    import hashlib
    report["code_sha256_12"] = {f: hashlib.sha256((REPO / "src/moemesh/model" / f).read_bytes()).hexdigest()[:12]
                                for f in ("moe.py", "grouped.py", "layers.py")}
    report["torch_compiler_has_is_non_strict_tracing"] = hasattr(torch.compiler, "_is_non_strict_tracing")
    print(f"torch {torch.__version__} gpu {report.get('gpu')} torchtitan {report.get('torchtitan')}", flush=True)

    def save():
        (out_dir / "moe_layer.json").write_text(json.dumps(report, indent=1) + "\n")

    cases = [c for c in CASES if c not in FUSED_CASES or kernels.available(torch.device(device))]
    report["skipped_cases"] = [c for c in CASES if c not in cases]  # the Triton kernels need CUDA or TRITON_INTERPRET=1
    for shape_name in args.shapes.split(","):
        shape = shapes[shape_name]
        D, F_, K = shape["dim"], shape["ffn_dim"], shape["top_k"]
        flops = 18 * tokens * K * D * F_
        master = make_master(shape, tokens, device, seed=1234)
        master["batch_shape"] = batch_shape
        for routing in ("natural", "balanced"):
            balanced = routing == "balanced"
            cell: dict = {"shape": shape, "expert_gemm_flops_per_iter": flops, "cases": {}}
            _, counts = routing_counts(master, shape, balanced)
            c = counts.double()
            cell["load"] = {"max_over_mean": round(float(c.max() / c.mean()), 3),
                            "min_over_mean": round(float(c.min() / c.mean()), 3),
                            "cv": round(float(c.std() / c.mean()), 3), "counts_E": counts.tolist()}
            outputs: dict = {}
            for p in range(args.passes):
                for name in cases:
                    key = f"{shape_name}/{routing}/{name}/pass{p}"
                    try:
                        res, y = run_case(name, master, shape, balanced, device, low, warmup, iters,
                                          profile=(p == 0 and not args.no_profile))
                        if p == 0 and y is not None and not name.startswith("gmm"):
                            outputs[name] = y.cpu()
                        del y
                    except Exception:
                        report["errors"].append(key + ": " + traceback.format_exc()[-3000:])
                        print(report["errors"][-1], flush=True)
                        continue
                    entry = cell["cases"].setdefault(name, {"passes": []})
                    entry["passes"].append(res)
                    print(f"[{key}] median {res['median_ms']:.3f} ms  "
                          f"{flops / (res['median_ms'] / 1000) / 1e12:.1f} TFLOP/s  peak {res.get('peak_gib')} GiB  "
                          f"syncs {res['host_syncs_per_iter']}", flush=True)
                    save()
            summarize(cell, flops, outputs)
            report["results"][f"{shape_name}/{routing}"] = cell
            save()
        del master
    print_table(report)
    save()
    return 1 if report["errors"] else 0


def _dist_version(name: str) -> str | None:
    try:
        from importlib.metadata import version
        return version(name)
    except Exception:
        return None


def summarize(cell: dict, flops: int, outputs: dict) -> None:
    cases = cell["cases"]
    for entry in cases.values():
        all_times = [t for p in entry["passes"] for t in p["times_ms"]]
        entry["median_ms"] = round(statistics.median(all_times), 3)
        entry["pass_medians_ms"] = [p["median_ms"] for p in entry["passes"]]
        entry["tflops"] = round(flops / (entry["median_ms"] / 1000) / 1e12, 1)
        entry["peak_gib"] = max((p.get("peak_gib") or 0) for p in entry["passes"]) or None
        entry["host_syncs_per_iter"] = entry["passes"][0]["host_syncs_per_iter"]
    ceiling = min((cases[n]["median_ms"] for n in ("gmm_only", "gmm_only_t") if n in cases), default=None)
    cell["ceiling_ms"] = ceiling
    fused_ceiling = cases.get("gmm_only_fused_act", {}).get("median_ms")
    for entry in cases.values():
        if ceiling:
            entry["ratio_to_gmm_only"] = round(ceiling / entry["median_ms"], 3)  # speed as a fraction of the ceiling
        if fused_ceiling:  # the ceiling with the same one-kernel activation moemesh trains with
            entry["ratio_to_gmm_only_fused_act"] = round(fused_ceiling / entry["median_ms"], 3)
    ratios = {}
    for a, b in (("moemesh_fp32_amp", "torchtitan_fp32_amp"), ("moemesh_bf16", "torchtitan_bf16"),
                 ("moemesh_fp32_amp", "torchtitan_bf16"), ("moemesh_bf16_fused", "torchtitan_bf16")):
        if a in cases and b in cases:
            ratios[f"{a}_speedup_over_{b}"] = round(cases[b]["median_ms"] / cases[a]["median_ms"], 3)
    cell["moemesh_vs_torchtitan"] = ratios
    checks = {}
    for a, b in (("moemesh_bf16", "torchtitan_bf16"), ("moemesh_fp32_amp", "torchtitan_fp32_amp"),
                 ("moemesh_fp32_amp", "moemesh_bf16"), ("moemesh_bf16_fused", "moemesh_bf16")):
        if a in outputs and b in outputs:
            checks[f"rel_err_output_{a}_vs_{b}"] = rel_err(outputs[a], outputs[b])
    cell["output_cross_check"] = checks


def print_table(report: dict) -> None:
    print("\n| shape | routing | case | ms (median) | pass medians | TFLOP/s | vs gmm-only / fused-act | peak GiB | syncs |")
    print("|---|---|---|---|---|---|---|---|---|")
    for key, cell in report["results"].items():
        shape_name, routing = key.split("/")
        for name, e in cell["cases"].items():
            print(f"| {shape_name} | {routing} | {name} | {e['median_ms']:.2f} | {e['pass_medians_ms']} | {e['tflops']} | "
                  f"{e.get('ratio_to_gmm_only')} / {e.get('ratio_to_gmm_only_fused_act')} | {e.get('peak_gib')} | {e.get('host_syncs_per_iter')} |")
        print(f"| {shape_name} | {routing} | load max/mean {cell['load']['max_over_mean']} | "
              f"{cell['moemesh_vs_torchtitan']} | {cell['output_cross_check']} |")
    if report["errors"]:
        print(f"\n{len(report['errors'])} errors; see moe_layer.json")


if __name__ == "__main__":
    sys.exit(main())
