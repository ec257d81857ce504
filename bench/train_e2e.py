"""End-to-end training speed on one GPU, before and after (issue 7), in one device call:

  (b) tokens/s, TFLOP/s, MFU (of 780 TFLOP/s, the measured H200 bf16 matmul ceiling) and peak memory of
      the `gpu` preset, a Mixtral-shaped and a fine-grained config, each with the code of commit 671d157
      ("before", carried in .before/src) and the current code ("after"), same process tree, same GPU;
      start-up time (building the model to the first step); activation checkpointing variants;
  (c) a profile of two steady-state steps of the current code: share of GPU time in GEMMs, attention,
      the optimizer, elementwise/other kernels, and idle;
  loss curves of 200 bf16 steps of the `gpu` preset, before and after.

    PYTHONPATH=src python3 bench/train_e2e.py --out $OUT          # needs .before/ (see docs/benchmarks.md)
    PYTHONPATH=src python bench/train_e2e.py --cpu-dry-run --out /tmp/x

Each training run is a child process (`--child`) that imports moemesh from the tree it is given, runs
`moemesh.train.loop.train` in-process and reports tokens/s (median of the logged windows after warm-up,
from metrics.jsonl), peak memory and start-up seconds as JSON.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import sys
from pathlib import Path

from child import profile_steps, run_child as run_child_process, timed_train, warm_trainer  # bench/child.py (bench/ is on sys.path when run as a script)

REPO = Path(__file__).resolve().parents[1]
PEAK_TFLOPS = 780.0
CONFIGS = {
    "gpu-preset": ("gpu", []),
    "mixtral-shaped": ("gpu", ["model.n_layers=2", "model.dim=4096", "model.ffn_dim=14336", "model.num_experts=8",
                               "model.top_k=2", "model.n_heads=32", "model.n_kv_heads=8", "model.vocab_size=32000",
                               "model.max_seq_len=4096", "train.seq_len=4096", "train.global_batch=4"]),
    "fine-grained": ("gpu", ["model.n_layers=6", "model.dim=2048", "model.ffn_dim=1408", "model.num_experts=64",
                             "model.top_k=6", "model.n_heads=16", "model.n_kv_heads=4", "model.vocab_size=32000",
                             "model.max_seq_len=4096", "train.seq_len=4096", "train.global_batch=4"]),
}


def child(args) -> None:
    """One training run in this process, with the moemesh of sys.path; prints one JSON line."""
    from moemesh.config import load_config

    cfg = load_config(args.preset, [*json.loads(args.overrides), f"run.dir={args.run_dir}", "run.progress=false",
                                    "run.tensorboard=false", *(["run.checkpoints=false"] if args.code == "after" else [])])
    if args.profile:
        _profile(cfg, args)
        return
    print("RESULT " + json.dumps(timed_train(cfg, args.warmup)), flush=True)


def _profile(cfg, args) -> None:
    """Two profiled steps after warm-up; GPU time by kernel class (plan/kernels.py; runs up to session 3's
    calls (bench/results/train_e2e.json) used other categories: gemm, attention, optimizer, copy/cast, elementwise/other) and the idle
    share of the window."""
    import torch

    from moemesh.parallel.comm_profile import union_us
    from moemesh.plan.kernels import classify

    trainer = warm_trainer(cfg, 5)
    prof, window_us = profile_steps(trainer, 6, 2)
    trainer.close()
    kernels = [e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
    by = {}
    busy = []
    for e in kernels:
        kind = classify(e.name)  # the planner's kernel classes (plan/kernels.py)
        by[kind] = by.get(kind, 0.0) + e.device_time
        busy.append((e.time_range.start, e.time_range.end))
    union = union_us(busy)
    total = sum(by.values())
    out = {"window_ms": window_us / 1e3, "kernel_ms": total / 1e3, "busy_ms": union / 1e3,
           "idle_frac": 1 - union / window_us, "share": {k: v / total for k, v in sorted(by.items())},
           **_idle_causes(prof, kernels)}
    print("RESULT " + json.dumps(out), flush=True)


def _idle_causes(prof, kernels) -> dict:
    """What to look at when the GPU idles: host calls that wait for the device or the allocator, the
    largest gaps between kernels (with their neighbours), and the kernels that take the most time."""
    import torch

    waits = {}
    for e in prof.events():
        if e.device_type == torch.autograd.DeviceType.CPU and any(
                k in e.name for k in ("Synchronize", "cudaMalloc", "cudaFree", "cudaMemcpy", "cudaHostAlloc")):
            count, us = waits.get(e.name, (0, 0.0))
            waits[e.name] = (count + 1, us + e.cpu_time_total)
    ordered = sorted(kernels, key=lambda e: e.time_range.start)
    gaps = sorted(((b.time_range.start - a.time_range.end, a.name[:60], b.name[:60])
                   for a, b in zip(ordered, ordered[1:])), reverse=True)[:6]
    top = {}
    for e in kernels:
        count, us = top.get(e.name[:80], (0, 0.0))
        top[e.name[:80]] = (count + 1, us + e.device_time)
    return {"host": _host_time(prof),
            "host_waits": {k: {"count": c, "ms": us / 1e3} for k, (c, us) in waits.items()},
            "largest_gaps_ms": [[g / 1e3, a, b] for g, a, b in gaps],
            "top_kernels_ms": [[k, c, us / 1e3] for k, (c, us) in sorted(top.items(), key=lambda kv: -kv[1][1])[:15]]}


def curve_diff(a: dict, b: dict) -> dict | None:
    """How far two runs' logged lm losses are apart: the largest relative difference per logged step, over
    all steps and from step 100 on, and of the final losses (summary.json's mean of the last ones)."""
    if "losses" not in a or "losses" not in b:
        return None
    diffs = [(x[0], abs(x[1] - y[1]) / abs(y[1])) for x, y in zip(a["losses"], b["losses"])]
    return {"max_rel": max(d for _, d in diffs), "max_rel_from_step_100": max((d for s, d in diffs if s >= 100), default=None),
            "worst_step": max(diffs, key=lambda sd: sd[1])[0],
            "final_rel": abs(a["final_lm_loss"] - b["final_lm_loss"]) / b["final_lm_loss"]}


def _host_time(prof) -> dict:
    """Where the host's time goes, per thread: the top-level host events (those without a parent: Python
    calls into torch, autograd nodes on the backward thread) by name, total milliseconds and count."""
    import torch

    threads: dict[int, dict[str, list[float]]] = {}
    for e in prof.events():
        if e.device_type == torch.autograd.DeviceType.CPU and e.cpu_parent is None:
            entry = threads.setdefault(e.thread, {}).setdefault(e.name[:70], [0.0, 0])
            entry[0] += e.cpu_time_total / 1e3
            entry[1] += 1
    out = {}
    for thread, names in threads.items():
        total = sum(ms for ms, _ in names.values())
        top = sorted(names.items(), key=lambda kv: -kv[1][0])[:25]
        out[str(thread)] = {"ms": total, "events": sum(n for _, n in names.values()),
                            "top": [[name, round(ms, 3), n] for name, (ms, n) in top]}
    return out


def run_child(tree: Path, preset: str, overrides: list[str], run_dir: Path, warmup: int, profile: bool = False,
              timeout: int = 400) -> dict:
    env = {**os.environ, "PYTHONPATH": str(tree), "PYTHONUNBUFFERED": "1"}
    code = tree.parent.name.strip(".") if tree.parent != REPO else "after"
    return run_child_process([__file__, "--child", "--preset", preset, "--overrides", json.dumps(overrides),
                            "--run-dir", str(run_dir), "--warmup", str(warmup), "--code", code]
                           + (["--profile"] if profile else []), env, timeout)


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out")
    parser.add_argument("--cpu-dry-run", action="store_true")
    parser.add_argument("--child", action="store_true")
    parser.add_argument("--preset")
    parser.add_argument("--overrides", default="[]")
    parser.add_argument("--run-dir")
    parser.add_argument("--warmup", type=int, default=10)
    parser.add_argument("--profile", action="store_true")
    parser.add_argument("--code", default="after", help="child: which tree (the old one has no run.checkpoints)")
    parser.add_argument("--only", default="", help="comma-separated labels to run (default: all)")
    args = parser.parse_args()
    if args.child:
        child(args)
        return 0
    import torch

    from moemesh.config import load_config
    from moemesh.plan.flops import flops_per_token

    if not args.out:
        parser.error("--out is required")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    trees = {"after": REPO / "src", "before": REPO / ".before" / "src"}
    steps, warmup = (30, 10) if not args.cpu_dry_run else (6, 2)
    dry = ["train.device=cpu", "train.dtype=float32", "model.n_layers=1", "model.dim=64", "model.ffn_dim=128",
           "model.n_heads=4", "model.n_kv_heads=2", "model.vocab_size=256", "model.num_experts=4", "model.top_k=2",
           "model.max_seq_len=64", "train.seq_len=64", "train.global_batch=2"] if args.cpu_dry_run else []
    report = {"command": " ".join(sys.argv), "date": datetime.datetime.now(datetime.timezone.utc).isoformat(),
              "torch": torch.__version__,
              "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
              "peak_tflops": PEAK_TFLOPS, "steps": steps, "warmup_steps": warmup, "runs": {}}

    def save():
        (out / "train_e2e.json").write_text(json.dumps(report, indent=1))

    plan = []
    for name, (preset, overrides) in CONFIGS.items():
        for code in ("before", "after"):
            plan.append((f"{name}/{code}", code, preset, [*overrides, f"train.steps={steps}", "run.log_every=5"]))
    plan += [(f"mixtral-shaped/after-recompute-{mode}", "after", "gpu",
              [*CONFIGS["mixtral-shaped"][1], f"train.steps={steps}", "run.log_every=5",
               f"train.activation_checkpointing={mode}"]) for mode in ("moe", "full")]
    # each config with one switch off (or compile on), in the same call as the defaults
    variants = {"torch-adamw": "train.fused_master_step=false", "compile": "train.compile=true",
                "unfused": "train.fused_kernels=false", "no-graph": "train.cuda_graph=off"}
    plan += [(f"{name}/after-{variant}", "after", "gpu", [*CONFIGS[name][1], f"train.steps={steps}", "run.log_every=5",
                                                         switch])
             for variant, switch in variants.items() for name in CONFIGS]
    for code in ("before", "after"):
        plan.append((f"gpu-preset-200/{code}", code, "gpu", ["train.steps=200", "run.log_every=10"]))
    # the same code twice (run-to-run spread of bf16 training on the GPU), and the kernels off
    plan.append(("gpu-preset-200/before-repeat", "before", "gpu", ["train.steps=200", "run.log_every=10"]))
    plan.append(("gpu-preset-200/after-unfused", "after", "gpu", ["train.steps=200", "run.log_every=10",
                                                                  "train.fused_kernels=false"]))
    plan.append(("gpu-preset-200/after-no-graph", "after", "gpu", ["train.steps=200", "run.log_every=10",
                                                                   "train.cuda_graph=off"]))
    only = set(filter(None, args.only.split(",")))
    for label, code, preset, overrides in plan:
        if only and label not in only:
            continue
        if not trees[code].is_dir():
            report["runs"][label] = {"error": f"{trees[code]} missing"}
            continue
        config_name = label.split("/")[0].replace("-200", "")
        base = CONFIGS.get(config_name, CONFIGS["gpu-preset"])[1]
        cfg = load_config(preset, [*base, *overrides, *dry])
        result = run_child(trees[code], preset, [*overrides, *dry], out / "runs" / label.replace("/", "_"), warmup)
        if "tokens_per_s" in result:
            flops = flops_per_token(cfg).per_token
            result["tflops"] = flops * result["tokens_per_s"] / 1e12
            result["mfu"] = result["tflops"] / PEAK_TFLOPS
            result["flops_per_token"] = flops
        report["runs"][label] = result
        print(label, {k: (round(v, 4) if isinstance(v, float) else v) for k, v in result.items()
                      if k not in ("losses", "stderr")}, result.get("stderr", "")[-1500:], flush=True)
        save()
    profiles = [(f"{name}/profile{suffix}", name, extra) for name in CONFIGS
                for suffix, extra in (("", []), ("-torch-adamw", ["train.fused_master_step=false"]),
                                      ("-compile", ["train.compile=true"]), ("-unfused", ["train.fused_kernels=false"]),
                                      ("-no-graph", ["train.cuda_graph=off"]))]
    for label, name, extra in profiles if torch.cuda.is_available() else ():
        if only and label not in only:
            continue
        preset, overrides = CONFIGS[name]
        report["runs"][label] = prof = run_child(trees["after"], preset, [*overrides, *extra, *dry],
                                                 out / "runs" / label.replace("/", "_"), warmup, profile=True)
        print(label, prof, flush=True)
        save()
    for name in CONFIGS:
        before, after = report["runs"].get(f"{name}/before", {}), report["runs"].get(f"{name}/after", {})
        if "tokens_per_s" in before and "tokens_per_s" in after:
            report["runs"][f"{name}/speedup"] = after["tokens_per_s"] / before["tokens_per_s"]
    report["loss_curves"] = {f"{x} vs {y}": curve_diff(report["runs"].get(f"gpu-preset-200/{x}", {}),
                                                       report["runs"].get(f"gpu-preset-200/{y}", {}))
                             for x, y in (("after", "before"), ("before-repeat", "before"),
                                          ("after-unfused", "before"), ("after", "after-unfused"),
                                          ("after", "after-no-graph"))}
    save()
    print(json.dumps({k: v for k, v in report.items() if k != "runs"}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
