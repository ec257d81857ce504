"""Issues 11 and 12: training at (dp, ep, tp) layouts of up to N GPUs of one host, in one device call.

    # issue 11, kind nvidia-h200-x4: the design's DP+EP example and the scaling 1 -> 2 -> 4 GPUs
    NCCL_NVLS_ENABLE=0 PYTHONPATH=src python3 bench/mesh_runs.py --gpus 4 --layouts "1,4,1;1,2,1;1,1,1" \\
        --configs fine-grained,mixtral-shaped --out $OUT
    # issue 12, kind nvidia-h200-x8: the design's 3D example and the planner's top 5 layouts at 8 GPUs
    NCCL_NVLS_ENABLE=0 PYTHONPATH=src python3 bench/mesh_runs.py --gpus 8 --layouts "2,2,2;1,1,1" \\
        --planner-top 5 --configs mixtral-shaped --out $OUT
    # the plumbing on CPU: gloo ranks, tiny configs, fp32
    PYTHONPATH=src python bench/mesh_runs.py --cpu-dry-run --gpus 4 --layouts "1,4,1;2,1,2;1,1,1" \\
        --planner-top 2 --out /tmp/mesh_runs

Per config (bench/train_e2e.py's CONFIGS) and layout, each layout's ranks train `--steps` steps from the
same seed on the same global batches as the 1-GPU run (1,1,1), which is always included:
  - step time (median after `--warmup` steps, max over ranks), tokens/s, TFLOP/s per GPU
    (moemesh.plan.flops), MFU against 780 TFLOP/s, peak `torch.cuda.max_memory_allocated` (max over ranks);
  - parity: relative error of the per-step loss and lm loss against the 1-GPU run over the first
    `--parity-steps` steps, against a stated tolerance (bf16 5e-3, the tolerance of the 2-GPU parity table
    in docs/benchmarks.md: bf16 rounding of activations and gradients summed in another order; fp32 in the
    dry run 1e-5);
  - a profiled window of `--profile-steps` more steps (not for steps replayed as one CUDA graph, whose
    collectives have no host ranges to attribute them by): per step, compute, TP / EP / DP communication
    (kernel time and the part not hidden behind compute) and idle (parallel/comm_profile.py), per rank;
  - the planner's prediction for that layout (moemesh.plan.search on `h200`, 8 GPUs per node): step time,
    allocated peak and its terms, beside the measurement; speed-up and scaling efficiency vs 1 GPU.
Each layout runs with the (sequence parallelism, activation checkpointing) variant that the planner ranks
best for it. `--planner-top K` adds the planner's K best distinct layouts at --gpus. With --gpus > 1 the
all-to-all at ep=N as moemesh issues it vs NCCL's all_to_all_single at the same bytes (bench/overlap.py
part (a)) runs in the N-rank launch.

One launch of local ranks per world size (launch_local: spawn on CUDA, fork on CPU), smallest first; a
launch whose rank fails is started again for the layouts it did not finish. No new launch starts after
`--deadline-s`. Writes mesh_runs.json under --out, after every launch.
"""

from __future__ import annotations

import argparse
import datetime
import gc
import json
import os
import statistics
import sys
import time
import traceback
from datetime import timedelta
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "src"))
sys.path.insert(0, str(REPO / "bench"))

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402

from moemesh.config import load_config  # noqa: E402
from moemesh.launch import finish, launch_local  # noqa: E402
from train_e2e import CONFIGS, PEAK_TFLOPS  # noqa: E402

BF16_TOLERANCE, FP32_TOLERANCE = 5e-3, 1e-5
GPUS_PER_NODE = 8
# Tiny stand-ins for the dry run: enough experts, heads and sequences for every layout of 8 ranks.
DRY_CONFIGS = {
    "mixtral-shaped": ("tiny", ["model.dim=64", "model.n_heads=4", "model.n_kv_heads=4", "model.num_experts=8",
                                "model.top_k=2", "model.ffn_dim=128", "model.n_layers=2", "train.global_batch=8",
                                "train.seq_len=32", "model.max_seq_len=32"]),
    "fine-grained": ("tiny", ["model.dim=64", "model.n_heads=4", "model.n_kv_heads=4", "model.num_experts=16",
                              "model.top_k=4", "model.ffn_dim=32", "model.n_layers=2", "train.global_batch=8",
                              "train.seq_len=32", "model.max_seq_len=32"]),
}
DRY_DEVICE = ["train.device=cpu", "train.dtype=float32"]
GPU_DEVICE = ["train.device=cuda", "train.dtype=bfloat16"]


def label(layout) -> str:
    return "x".join(map(str, layout))


# --- the planner (driver, CPU only) -------------------------------------------------------------------

def _candidate_row(c, tokens: int) -> dict:
    from moemesh.plan.memory import GIB

    return {"dp": c.dp, "ep": c.ep, "tp": c.tp, "sequence_parallel": c.sequence_parallel,
            "activation_checkpointing": c.recompute, "cuda_graph": c.graphed, "step_ms": c.step_s * 1e3, "tokens_per_s": tokens / c.step_s,
            "memory_gib": c.memory / GIB, "build_gib": c.build / GIB, "device_gib": c.need / GIB, "fits": c.fits, "bottleneck": c.bottleneck,
            "terms_ms": {k: v * 1e3 for k, v in c.terms.items()}}


def planner_rows(cfg, gpus: int) -> list[dict]:
    """Every candidate of `moemesh plan` at `gpus` (h200, 8 per node, shipped constants), best first;
    those that do not fit last."""
    from moemesh.plan.cost import GPUS, H200_CONSTANTS
    from moemesh.plan.search import IMBALANCE, enumerate_plans, rank

    cands = enumerate_plans(cfg, gpus, GPUS_PER_NODE, GPUS["h200"], H200_CONSTANTS, IMBALANCE)
    ranked = rank(cands)
    tokens = cfg.train.global_batch * cfg.train.seq_len
    return [_candidate_row(c, tokens) for c in ranked + [c for c in cands if not c.fits]]


def top_layouts(rows: list[dict], k: int) -> list[dict]:
    """The k best distinct (dp, ep, tp), each with its best-ranked variant."""
    seen, out = set(), []
    for row in rows:
        key = (row["dp"], row["ep"], row["tp"])
        if row["fits"] and key not in seen:
            seen.add(key)
            out.append(row)
    return out[:k]


def prediction_for(rows_at_world: list[dict], layout: tuple[int, int, int]) -> dict | None:
    """The planner's best-ranked variant of this layout among its candidates at the layout's world size
    (None: no valid candidate)."""
    for row in rows_at_world:
        if (row["dp"], row["ep"], row["tp"]) == tuple(layout):
            return row
    return None


# --- one layout, on every rank of a launch ------------------------------------------------------------

def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def run_layout(job: dict, spec: dict, device: torch.device) -> dict:
    from torch.profiler import ProfilerActivity, profile

    from moemesh.parallel import comm_profile
    from moemesh.parallel.mesh import Mesh
    from moemesh.plan.flops import flops_per_token
    from moemesh.train.data import build_source
    from moemesh.train.loop import Trainer

    dp, ep, tp = job["layout"]
    steps, warmup, profiled = spec["steps"], spec["warmup"], spec["profile_steps"]
    cfg = load_config(job["preset"], [*job["overrides"], f"parallel.dp={dp}", f"parallel.ep={ep}", f"parallel.tp={tp}",
                                      f"parallel.sequence_parallel={str(job['sequence_parallel']).lower()}",
                                      f"train.activation_checkpointing={job['activation_checkpointing']}",
                                      "run.progress=false", "run.tensorboard=false",
                                      f"train.steps={steps + profiled}", "train.warmup_steps=1"])
    world = dp * ep * tp
    mesh = Mesh(dp, ep, tp, device.type, timeout_s=spec["timeout_s"]) if world > 1 else None
    source = build_source(cfg.data, cfg.model.vocab_size, cfg.train.seq_len, cfg.train.seed)
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    started = time.perf_counter()
    trainer = Trainer(cfg, mesh, source, device)
    build_s = time.perf_counter() - started
    # Each rank builds the full model before sharding it (design.md §11): that peak apart from training's.
    build_peak = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    rows, times = [], []
    try:
        for step in range(1, steps + 1):
            _sync(device)
            t0 = time.perf_counter()
            losses, grad_norm, _, _ = trainer.step(step)
            rows.append([*losses.tolist(), float(grad_norm)])  # the step's end, on the host
            times.append(time.perf_counter() - t0)
        dist.barrier()
        split = None
        # A replayed graph's collectives have no host ranges to attribute its kernels by: no split for it.
        if profiled and not trainer.captured:
            activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
            with profile(activities=activities) as prof:
                t0 = time.perf_counter()
                for step in range(steps + 1, steps + profiled + 1):
                    trainer.step(step)
                _sync(device)
                window_us = (time.perf_counter() - t0) * 1e6
            split = comm_profile.split(comm_profile.from_kineto(prof.profiler.kineto_results.events()), window_us,
                                       profiled)
    finally:
        trainer.close()
    graphed = trainer.captured  # its steps were replayed as one CUDA graph (train/cuda_graph.py)
    peak = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None
    step_s = _world_max(statistics.median(times[warmup:]), device)
    splits = [None] * dist.get_world_size()
    dist.all_gather_object(splits, split)
    tokens_per_s = cfg.train.global_batch * cfg.train.seq_len / step_s
    tflops = flops_per_token(cfg).per_token * tokens_per_s / world / 1e12
    del trainer, mesh
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return {"layout": [dp, ep, tp], "overrides": job["overrides"], "sequence_parallel": job["sequence_parallel"],
            "activation_checkpointing": job["activation_checkpointing"],
            "parallel": {k: getattr(cfg.parallel, k) for k in ("overlap_grad_reduce", "bucket_mb", "ep_overlap_chunks")},
            "cuda_graph": graphed, "build_s": round(build_s, 2), "step_ms": 1e3 * step_s, "step_ms_all": [1e3 * t for t in times],
            "tokens_per_s": tokens_per_s, "tflops_per_gpu": tflops, "mfu": tflops / PEAK_TFLOPS,
            "peak_gib": peak and _world_max(peak, device), "build_peak_gib": build_peak and _world_max(build_peak, device),
            "losses": rows, "loss_columns": ["loss", "lm_loss", "aux_loss", "z_loss", "grad_norm"],
            "split_rank0": splits[0], "split_per_rank": splits}


def _world_max(value: float, device: torch.device) -> float:
    t = torch.tensor([value], dtype=torch.float64, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return float(t.item())


def worker(spec: dict) -> int:
    """One launch: the jobs of one world size (and, in the N-rank launch, the all-to-all benchmark).
    Rank 0 rewrites the part file after each job; a rank whose job fails writes its traceback and ends
    at once (the launcher then stops its peers, and the driver starts the rest again)."""
    dry = spec["dry"]
    if not dry:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    dist.init_process_group("gloo" if dry else "nccl", timeout=timedelta(seconds=spec["timeout_s"] + 60))
    device = torch.device("cpu") if dry else torch.device("cuda", torch.cuda.current_device())
    rank = dist.get_rank()
    part_path = Path(spec["part"])
    part = {"gpu": None if dry else torch.cuda.get_device_name(), "torch": torch.__version__, "runs": {}}

    def save():
        if rank == 0:
            part_path.write_text(json.dumps(part, indent=1))

    current = "a2a"
    try:
        if spec["a2a"]:
            from moemesh.parallel.mesh import Mesh
            from overlap import Bench, bench_all_to_all

            part["a2a"] = bench_all_to_all(Bench(dry, 1 if dry else 5, 3 if dry else 20),
                                           Mesh(1, dist.get_world_size(), 1, device.type, timeout_s=spec["timeout_s"]))
            save()
        for job in spec["jobs"]:
            current = job["key"]
            t0 = time.perf_counter()
            result = run_layout(job, spec, device)
            result["wall_s"] = round(time.perf_counter() - t0, 2)
            part["runs"][job["key"]] = result
            if rank == 0:
                print(f"[mesh_runs] {job['key']}: {result['step_ms']:.1f} ms/step {result['tokens_per_s']:.0f} tok/s "
                      f"MFU {result['mfu']:.3f} peak {result['peak_gib']} GiB ({result['wall_s']} s)", flush=True)
            save()
    except Exception:
        Path(f"{spec['part']}.rank{rank}.error").write_text(json.dumps({"job": current, "traceback":
                                                                         traceback.format_exc()[-4000:]}))
        print(f"[mesh_runs] rank {rank} failed in {current}:\n{traceback.format_exc()[-2000:]}", flush=True)
        return finish(1, exit_process=False)
    return finish(0, exit_process=False)


# --- the driver -------------------------------------------------------------------------------------

def parse_layouts(text: str) -> list[tuple[int, int, int]]:
    out = []
    for item in filter(None, (s.strip() for s in text.split(";"))):
        parts = [int(x) for x in item.split(",")]
        if len(parts) != 3 or min(parts) < 1:
            raise SystemExit(f"--layouts: {item!r} is not dp,ep,tp with each >= 1")
        out.append(tuple(parts))
    return out


def build_jobs(args, configs: dict) -> tuple[list[dict], dict]:
    """Jobs (one per config and layout) and, per config, the planner's top layouts at --gpus."""
    jobs, planner = [], {}
    device = DRY_DEVICE if args.cpu_dry_run else GPU_DEVICE
    for name, (preset, overrides) in configs.items():
        overrides = [*overrides, *device, *args.set]
        cfg = load_config(preset, overrides)
        rows = planner_rows(cfg, args.gpus)
        by_world = {(args.gpus, False): rows}
        planner[name] = {"gpus": args.gpus, "gpus_per_node": GPUS_PER_NODE, "gpu": "h200",
                         "top_layouts": top_layouts(rows, max(args.planner_top, 5)), "top_rows": rows[:10]}
        layouts = list(dict.fromkeys([*([] if args.no_single else [(1, 1, 1)]), *args.layouts,
                                      *((r["dp"], r["ep"], r["tp"]) for r in top_layouts(rows, args.planner_top))]))
        for layout in layouts:
            if layout[0] * layout[1] * layout[2] > args.gpus:
                raise SystemExit(f"--layouts: {label(layout)} needs {layout[0] * layout[1] * layout[2]} GPUs; --gpus={args.gpus}")
            world = layout[0] * layout[1] * layout[2]
            # --graph-meshes: the step as one CUDA graph where a mesh can capture it (ep=1), op by op elsewhere
            graph = args.graph_meshes and world > 1 and layout[1] == 1
            job_overrides = [*overrides, "train.cuda_graph=on"] if graph else overrides
            if (world, graph) not in by_world:
                by_world[world, graph] = planner_rows(load_config(preset, job_overrides), world)
            pred = prediction_for(by_world[world, graph], layout)
            if pred is None:
                raise SystemExit(f"{name}: {label(layout)} is not a valid layout for this config (config rules)")
            jobs.append({"key": f"{name}/{label(layout)}", "config": name, "preset": preset, "overrides": job_overrides,
                         "layout": list(layout), "sequence_parallel": pred["sequence_parallel"],
                         "activation_checkpointing": pred["activation_checkpointing"], "prediction": pred})
    return jobs, planner


def run_world(world: int, jobs: list[dict], args, report: dict, a2a: bool, deadline: float) -> None:
    """Launch `world` ranks for these jobs; again for those left when a launch fails."""
    pending, attempt = list(jobs), 0
    parts = Path(args.out) / "parts"
    parts.mkdir(parents=True, exist_ok=True)
    while (pending or a2a) and time.perf_counter() < deadline:
        attempt += 1
        # numbered by launch: with --launch-per-job every job's launches get their own part and error files
        part = parts / f"launch{len(report['launches']) + 1}-world{world}-attempt{attempt}.json"
        spec = {"dry": args.cpu_dry_run, "jobs": pending, "a2a": a2a, "part": str(part), "steps": args.steps,
                "warmup": args.warmup, "profile_steps": args.profile_steps, "timeout_s": args.timeout_s}
        t0 = time.perf_counter()
        failure = launch_local(worker, (spec,), world, fork=args.cpu_dry_run)
        report["launches"].append({"world": world, "attempt": attempt, "jobs": [j["key"] for j in pending],
                                   "wall_s": round(time.perf_counter() - t0, 1), "failure": failure and str(failure)})
        got = json.loads(part.read_text()) if part.exists() else {"runs": {}}
        report.setdefault("gpu", got.get("gpu"))
        report.setdefault("worker_torch", got.get("torch"))
        a2a_lost = a2a and "a2a" not in got
        if a2a and "a2a" in got:
            report["a2a"] = {"ep": world, "rows": got["a2a"]}
        a2a = False  # one try: it comes first, so a failure there is its own
        for job in pending:
            if job["key"] in got["runs"]:
                report["runs"][job["key"]] = {**got["runs"][job["key"]], "prediction": job["prediction"]}
        pending = [j for j in pending if j["key"] not in got["runs"]]
        if failure is None or not pending:
            if failure is not None:
                report["errors"].append(f"world {world}: {failure}")
            break
        # The first rank to fail says why; its peers then fail in a collective ("connection closed").
        files = sorted(parts.glob(f"{part.name}.rank*.error"), key=lambda p: p.stat().st_mtime_ns)
        errors = [{**json.loads(p.read_text()), "rank": p.name.rsplit(".rank", 1)[1].split(".")[0]} for p in files]
        # Without an error file (a rank killed outright) the blame goes to what was running: the
        # all-to-all if it never finished, else the first layout not done. Each attempt drops >= 1 job.
        failed = [e["job"] for e in errors] or ["a2a" if a2a_lost else pending[0]["key"]]
        for key in dict.fromkeys(failed):
            if key == "a2a":
                report["errors"].append(f"a2a at ep={world}: " + next((e["traceback"] for e in errors if e["job"] == key),
                                                                      f"launch failed: {failure}"))
                continue
            tb = [f"rank {e['rank']}: {e['traceback']}" for e in errors if e["job"] == key]
            report["runs"][key] = {"error": tb[0] if tb else f"launch failed: {failure}", "rank_errors": tb[1:],
                                   "launch_failure": str(failure)}
        pending = [j for j in pending if j["key"] not in failed]
    for j in pending:
        report["runs"].setdefault(j["key"], {"error": f"not run: past the {args.deadline_s:.0f} s deadline"})


def derive(report: dict, jobs: list[dict], tolerance: float, parity_steps: int) -> None:
    """Parity against the 1-GPU run, speed-up and scaling efficiency, prediction errors: from the runs."""
    for job in jobs:
        run = report["runs"].get(job["key"], {})
        ref = report["runs"].get(f"{job['config']}/1x1x1", {})
        if "losses" not in run or "losses" not in ref:
            continue
        world = job["layout"][0] * job["layout"][1] * job["layout"][2]
        n = min(parity_steps, len(run["losses"]), len(ref["losses"]))
        rel = [[abs(a - b) / max(abs(b), 1e-30) for a, b in zip(row, ref_row)]
               for row, ref_row in zip(run["losses"][:n], ref["losses"][:n])]
        worst = max(max(r[0], r[1]) for r in rel)
        run["parity"] = {"steps": n, "tolerance": tolerance, "loss_rel_err": [r[0] for r in rel],
                         "lm_loss_rel_err": [r[1] for r in rel], "grad_norm_rel_err": [r[4] for r in rel],
                         "worst_loss_rel_err": worst, "passed": worst <= tolerance}
        run["speedup_vs_1gpu"] = run["tokens_per_s"] / ref["tokens_per_s"]
        run["scaling_efficiency"] = run["speedup_vs_1gpu"] / world
        pred = run["prediction"]
        run["predicted_vs_measured"] = {
            "step_ms": [pred["step_ms"], run["step_ms"]], "step_err": pred["step_ms"] / run["step_ms"] - 1,
            "memory_gib": [pred["memory_gib"], run["peak_gib"]],
            "memory_err": run["peak_gib"] and pred["memory_gib"] / run["peak_gib"] - 1,
            "build_gib": [pred["build_gib"], run["build_peak_gib"]]}


def print_table(report: dict) -> None:
    print(f"{'run':<28} {'ms/step':>8} {'tok/s':>9} {'TF/GPU':>7} {'MFU':>6} {'GiB':>6} {'eff':>5} "
          f"{'parity':>9} {'pred ms':>8} {'tp/ep/dp exposed ms':>20} {'idle':>5}")
    for key, run in sorted(report["runs"].items()):
        if "error" in run:
            print(f"{key:<28} error: {run['error'].strip().splitlines()[-1][:100]}")
            continue
        s = run["split_rank0"] or {}  # None: not profiled (--profile-steps 0)
        exposed = "/".join(f"{s['exposed_ms'][c]:.1f}" for c in ("tp", "ep", "dp")) if "exposed_ms" in s else \
            "/".join(f"{s['comm_ms'][c]:.1f}" for c in ("tp", "ep", "dp")) if "comm_ms" in s else "-"
        idle = f"{s['idle_share']:.2f}" if s.get("idle_share") is not None else "-"
        parity = run.get("parity", {})
        print(f"{key:<28} {run['step_ms']:>8.1f} {run['tokens_per_s']:>9.0f} {run['tflops_per_gpu']:>7.1f} "
              f"{run['mfu']:>6.3f} {run['peak_gib'] or 0:>6.1f} {run.get('scaling_efficiency', 0):>5.2f} "
              f"{parity.get('worst_loss_rel_err', float('nan')):>9.1e} {run['prediction']['step_ms']:>8.1f} "
              f"{exposed:>20} {idle:>5}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default=os.environ.get("OUT", "/tmp/moemesh-mesh-runs"))
    parser.add_argument("--gpus", type=int, required=True, help="GPUs (ranks) of the host: layouts use at most this")
    parser.add_argument("--layouts", type=parse_layouts, default=[], help='"dp,ep,tp;..." (1,1,1 is run too, '
                        'unless --no-single)')
    parser.add_argument("--planner-top", type=int, default=0, help="also run the planner's K best layouts at --gpus")
    parser.add_argument("--configs", default="fine-grained,mixtral-shaped", help=f"of {', '.join(CONFIGS)}")
    parser.add_argument("--set", action="append", default=[], help="KEY=VALUE override on every config")
    parser.add_argument("--steps", type=int, default=None, help="timed steps (default 14; dry run 4)")
    parser.add_argument("--warmup", type=int, default=None, help="steps left out of the median (default 4; dry 2)")
    parser.add_argument("--profile-steps", type=int, default=None, help="profiled steps after them (default 3; dry 2)")
    parser.add_argument("--parity-steps", type=int, default=None, help="steps compared with 1 GPU (default 5; dry 4)")
    parser.add_argument("--no-single", action="store_true", help="no 1-GPU run (no parity, no speed-up)")
    parser.add_argument("--no-a2a", action="store_true", help="skip the all-to-all benchmark at ep=--gpus")
    parser.add_argument("--deadline-s", type=float, default=420.0, help="start no launch after this many seconds")
    parser.add_argument("--timeout-s", type=float, default=240.0, help="a collective waiting longer fails the launch")
    parser.add_argument("--cpu-dry-run", action="store_true", help="gloo ranks on the CPU, tiny configs, fp32")
    parser.add_argument("--graph-meshes", action="store_true",
                        help="train.cuda_graph=on at multi-GPU layouts without expert parallelism ('auto' leaves "
                             "a mesh's step op by op for now: train/cuda_graph.py MESH_AUTO)")
    parser.add_argument("--launch-per-job", action="store_true",
                        help="a fresh launch for every (config, layout), as `moemesh train` runs one (the "
                             "planner's multi-GPU measurements: bench/mesh_sweep.sh)")
    parser.add_argument("--plan-only", action="store_true", help="print the runs and the planner's predictions; launch nothing")
    args = parser.parse_args()
    started = time.perf_counter()
    dry = args.cpu_dry_run
    args.steps = args.steps or (4 if dry else 14)
    args.warmup = args.warmup if args.warmup is not None else (2 if dry else 4)
    args.profile_steps = args.profile_steps if args.profile_steps is not None else (2 if dry else 3)
    args.parity_steps = args.parity_steps or (4 if dry else 5)
    if args.warmup >= args.steps:
        parser.error(f"--warmup={args.warmup} must be below --steps={args.steps}")
    table = DRY_CONFIGS if dry else CONFIGS
    names = [c for c in args.configs.split(",") if c]
    unknown = [c for c in names if c not in table]
    if unknown:
        parser.error(f"--configs: unknown {unknown} (known: {', '.join(table)})")
    os.environ.setdefault("NCCL_NVLS_ENABLE", "0")  # docs: NVLink multicast stays off on the lent machines
    os.environ.setdefault("TORCH_SYMM_MEM_DISABLE_MULTICAST", "1")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    jobs, planner = build_jobs(args, {c: table[c] for c in names})
    tolerance = FP32_TOLERANCE if dry else BF16_TOLERANCE
    report = {"command": " ".join(["python3", *sys.argv]), "dry_run": dry, "torch": torch.__version__,
              "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
              "gpus": args.gpus, "peak_tflops": PEAK_TFLOPS, "steps": args.steps, "warmup": args.warmup,
              "profile_steps": args.profile_steps, "parity": {"steps": args.parity_steps, "tolerance": tolerance,
                                                              "dtype": "float32" if dry else "bfloat16"},
              "planner": planner, "launches": [], "runs": {}, "errors": []}
    path = out / "mesh_runs.json"
    if args.plan_only:
        for j in jobs:
            p = j["prediction"]
            print(f"{j['key']:<28} SP={p['sequence_parallel']!s:<5} recompute={p['activation_checkpointing']:<5} "
                  f"predicted {p['step_ms']:.1f} ms/step {p['memory_gib']:.1f} GiB allocated")
        for name, plan in planner.items():
            print(f"{name}: planner's top layouts at {args.gpus} GPUs: "
                  + ", ".join(f"{label((r['dp'], r['ep'], r['tp']))} ({r['step_ms']:.1f} ms)" for r in plan["top_layouts"]))
        return 0
    worlds = sorted({j["layout"][0] * j["layout"][1] * j["layout"][2] for j in jobs} | ({args.gpus} if args.gpus > 1 and not args.no_a2a else set()))
    for world in worlds:
        todo = [j for j in jobs if j["layout"][0] * j["layout"][1] * j["layout"][2] == world]
        a2a = world == args.gpus and args.gpus > 1 and not args.no_a2a
        if args.launch_per_job:  # the all-to-all benchmark (if any) in a launch of its own, last
            for batch in [[j] for j in todo] + ([[]] if a2a else []):
                run_world(world, batch, args, report, a2a and not batch, started + args.deadline_s)
        else:
            run_world(world, todo, args, report, a2a, started + args.deadline_s)
        derive(report, jobs, tolerance, args.parity_steps)
        report["script_s"] = round(time.perf_counter() - started, 1)
        path.write_text(json.dumps(report, indent=1) + "\n")
    print_table(report)
    failed = [k for k, r in report["runs"].items() if "error" in r] + report["errors"]
    print(f"{len(report['runs']) - len(failed)} of {len(jobs)} runs in {report['script_s']} s -> {path}"
          + (f"; failed: {failed}" if failed else ""))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
