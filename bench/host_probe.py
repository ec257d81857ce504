"""Where a step's time goes on the host: per layout, the step time (synced), the host's time until the step
returns (no sync), the host syncs a step makes, and a cProfile of rank 0's host (issue 9: the planner's
step on a mesh is host-bound; this measures by how much and where).

    NCCL_NVLS_ENABLE=0 PYTHONPATH=src python3 bench/host_probe.py --gpus 2 --out $OUT     (GPU)
    PYTHONPATH=src python bench/host_probe.py --cpu-dry-run --gpus 2 --out /tmp/host_probe  (plumbing)

Per config (`--configs`: the `gpu` preset and a skeleton of it with tiny dims, whose step is host time
only) and layout (every (dp, ep, tp) of --gpus GPUs and 1 GPU, the latter with and without the CUDA graph):
  step_ms  median synced step (after --warmup), max over ranks;
  host_ms  median time until Trainer.step returns, before any sync (the host's launches, and its waits
           at the step's own syncs), max over ranks;
  syncs    host syncs in one step (torch.cuda.set_sync_debug_mode, which may miss some);
  profile  rank 0's cProfile of --profile-steps steps: the top functions by own time.
The 1-GPU jobs run in this process, the mesh jobs in one launch of --gpus ranks (`--passes` repeats them
there; step times of host-bound steps vary between lent machines: compare layouts within one call).
Writes host_probe.json under --out.
"""

from __future__ import annotations

import argparse
import cProfile
import io
import json
import os
import pstats
import statistics
import sys
import time
import warnings
from datetime import timedelta
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "src"))

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402

from moemesh.config import load_config  # noqa: E402
from moemesh.launch import finish, launch_local  # noqa: E402

SKELETON = ["model.dim=256", "model.ffn_dim=256", "model.n_heads=4", "model.n_kv_heads=4", "model.vocab_size=1024",
            "model.max_seq_len=256", "train.seq_len=256", "train.global_batch=8"]
CONFIGS = {"gpu-preset": [], "skeleton-L8": SKELETON, "skeleton-L2": [*SKELETON, "model.n_layers=2"]}
GPU_DEVICE = ["train.device=cuda", "train.dtype=bfloat16"]
DRY_DEVICE = ["train.device=cpu", "train.dtype=float32", "model.dim=64", "model.ffn_dim=64", "train.global_batch=8",
              "model.vocab_size=256", "train.seq_len=32", "model.max_seq_len=32"]


def layouts(gpus: int) -> list[tuple[int, int, int]]:
    return [(dp, ep, gpus // (dp * ep)) for dp in range(1, gpus + 1) for ep in range(1, gpus + 1)
            if gpus % (dp * ep) == 0]


def probe(name: str, overrides: list[str], layout, extra: list[str], spec: dict, device: torch.device) -> dict:
    from moemesh.parallel.mesh import Mesh
    from moemesh.train.data import build_source
    from moemesh.train.loop import Trainer

    dp, ep, tp = layout
    steps = spec["warmup"] + spec["steps"]
    cfg = load_config("gpu", [*overrides, *extra, f"parallel.dp={dp}", f"parallel.ep={ep}", f"parallel.tp={tp}",
                              "run.progress=false", "run.tensorboard=false", "train.warmup_steps=1",
                              f"train.steps={steps + spec['profile_steps'] + 4}"])
    mesh = Mesh(dp, ep, tp, device.type, timeout_s=spec["timeout_s"]) if dp * ep * tp > 1 else None
    source = build_source(cfg.data, cfg.model.vocab_size, cfg.train.seq_len, cfg.train.seed)
    trainer = Trainer(cfg, mesh, source, device)
    cuda = device.type == "cuda"
    step_t, host_t = [], []
    try:
        for step in range(1, steps + 1):
            if cuda:
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            losses, _, _, _ = trainer.step(step)
            host_t.append(time.perf_counter() - t0)
            losses.tolist()
            step_t.append(time.perf_counter() - t0)
        step = steps + 1
        syncs = None
        if cuda:
            torch.cuda.synchronize()
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                torch.cuda.set_sync_debug_mode("warn")
                try:
                    trainer.step(step)
                finally:
                    torch.cuda.set_sync_debug_mode("default")
            syncs = len([w for w in caught if "synchroniz" in str(w.message).lower()])
            torch.cuda.synchronize()
        profiler = cProfile.Profile()
        profiler.enable()
        for step in range(steps + 2, steps + 2 + spec["profile_steps"]):
            trainer.step(step)
        if cuda:
            torch.cuda.synchronize()
        profiler.disable()
        if spec.get("kineto"):  # as bench/mesh_runs.py profiles each layout after timing it
            from torch.profiler import ProfilerActivity, profile
            with profile(activities=[ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])):
                for step in range(steps + 2 + spec["profile_steps"], steps + 4 + spec["profile_steps"]):
                    trainer.step(step)
                if cuda:
                    torch.cuda.synchronize()
    finally:
        trainer.close()
    text = io.StringIO()
    pstats.Stats(profiler, stream=text).sort_stats("tottime").print_stats(spec["top"])
    warm = spec["warmup"]
    return {"config": name, "layout": list(layout), "extra": extra,
            "step_ms": _world_max(1e3 * statistics.median(step_t[warm:]), device),
            "host_ms": _world_max(1e3 * statistics.median(host_t[warm:]), device),
            "step_ms_all": [round(1e3 * t, 2) for t in step_t], "host_ms_all": [round(1e3 * t, 2) for t in host_t],
            "syncs": syncs, "n_layers": cfg.model.n_layers,
            "profile": "\n".join(line.rstrip() for line in text.getvalue().splitlines()[:spec["top"] + 12])}


def _world_max(value: float, device: torch.device) -> float:
    if not dist.is_initialized():
        return value
    t = torch.tensor([value], dtype=torch.float64, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return float(t.item())


def run_jobs(spec: dict, device: torch.device) -> dict:
    out = {}
    for job in spec["jobs"]:
        key = f"{job['config']}/{'x'.join(map(str, job['layout']))}{job['suffix']}"
        try:
            out[key] = probe(job["config"], job["overrides"], tuple(job["layout"]), job["extra"], spec, device)
            if not dist.is_initialized() or dist.get_rank() == 0:
                r = out[key]
                print(f"[host_probe] {key}: step {r['step_ms']:.1f} ms host {r['host_ms']:.1f} ms syncs {r['syncs']}",
                      flush=True)
        except Exception as exc:  # noqa: BLE001 - recorded, the next job goes on
            out[key] = {"error": f"{exc.__class__.__name__}: {str(exc)[:400]}"}
            print(f"[host_probe] {key}: {out[key]['error']}", flush=True)
            if dist.is_initialized():
                raise
    return out


def worker(spec: dict) -> int:
    dry = spec["dry"]
    if not dry:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    dist.init_process_group("gloo" if dry else "nccl", timeout=timedelta(seconds=spec["timeout_s"] + 60))
    device = torch.device("cpu") if dry else torch.device("cuda", torch.cuda.current_device())
    runs = run_jobs(spec, device)
    if dist.get_rank() == 0:
        Path(spec["part"]).write_text(json.dumps(runs))
    return finish(0, exit_process=False)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--gpus", type=int, default=2)
    ap.add_argument("--configs", default=",".join(CONFIGS))
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--profile-steps", type=int, default=3)
    ap.add_argument("--top", type=int, default=30)
    ap.add_argument("--timeout-s", type=int, default=120)
    ap.add_argument("--cpu-dry-run", action="store_true")
    ap.add_argument("--passes", type=int, default=1, help="run the mesh jobs this many times in one launch")
    ap.add_argument("--kineto", action="store_true", help="also run torch.profiler for 2 steps after each job")
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    device_set = DRY_DEVICE if args.cpu_dry_run else GPU_DEVICE
    names = args.configs.split(",")
    spec = {"dry": args.cpu_dry_run, "steps": args.steps, "warmup": args.warmup, "profile_steps": args.profile_steps,
            "top": args.top, "timeout_s": args.timeout_s, "kineto": args.kineto}
    started = time.perf_counter()
    report = {"format": "moemesh host_probe 1", "command": " ".join(sys.argv), "torch": torch.__version__,
              "gpu": None if args.cpu_dry_run else torch.cuda.get_device_name(), "gpus": args.gpus, "runs": {}}
    one = []
    for name in names:
        one.append({"config": name, "overrides": [*CONFIGS[name], *device_set], "layout": [1, 1, 1], "extra": [],
                    "suffix": ""})
        if not args.cpu_dry_run:
            one.append({"config": name, "overrides": [*CONFIGS[name], *device_set], "layout": [1, 1, 1],
                        "extra": ["train.cuda_graph=off"], "suffix": "-eager"})
    report["runs"].update(run_jobs({**spec, "jobs": one}, torch.device("cpu" if args.cpu_dry_run else "cuda")))
    (out / "host_probe.json").write_text(json.dumps(report, indent=1))
    if args.gpus > 1:
        jobs = [{"config": name, "overrides": [*CONFIGS[name], *device_set], "layout": list(lay), "extra": [],
                 "suffix": f"-pass{p}" if p else ""} for p in range(args.passes) for name in names
                for lay in layouts(args.gpus) if lay != (1, 1, 1)]
        part = out / f"world{args.gpus}.json"
        failure = launch_local(worker, ({**spec, "jobs": jobs, "part": str(part)},), args.gpus, fork=args.cpu_dry_run)
        if part.exists():
            report["runs"].update(json.loads(part.read_text()))
        report["failure"] = failure and str(failure)
    report["script_s"] = round(time.perf_counter() - started, 1)
    (out / "host_probe.json").write_text(json.dumps(report, indent=1))
    failed = [key for key, run in report["runs"].items() if "error" in run]
    if failed or report.get("failure"):
        print(f"[host_probe] failed: {failed or report['failure']}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
