"""Measurements for calibrating and validating `moemesh plan` on one GPU (issue 9), in one device call.

Two disjoint lists of single-GPU configs (the `gpu` preset with overrides):
  CALIBRATION  the 13 held-out configs of the previous validation (plan_validate_v2.json: evaluated once,
               so spent as a test), bench/train_e2e.py's three (gpu preset, Mixtral-shaped, fine-grained) and
               two earlier calibration configs last, run only if time is left: the constants are fitted on these;
  HELDOUT      13 configs never measured before (none in CALIBRATION, RETIRED or train_e2e.py), across dim,
               experts, top-k, ffn, sequence length, batch, layers, vocabulary and checkpointing, with
               long sequences and many small experts (the previous model's misses): the validation.
Each config runs in its own child process (bench/child.py):
  1. the timed run: `moemesh.train.loop.train` in-process, STEPS steps, `run.checkpoints=false`; step time
     = tokens per step / median tokens/s of the logged windows after WARMUP steps (metrics.jsonl), peak
     memory = `torch.cuda.max_memory_allocated`, plus start-up time and loss;
  2. the profile: PROFILE_STEPS further steps of the timed run's Trainer (kept open past train()'s end:
     bench/child.py:trainer_kept_open) under torch.profiler, host and device activity: GPU milliseconds and
     kernel count per step for each kernel class (moemesh/plan/kernels.py: gemm, grouped_gemm, attention,
     elementwise, head, optimizer), idle = window - the union of the kernels' intervals, and the 12
     largest kernels by name (so the classification can be checked and redone offline). A failed profile
     leaves the timed run's numbers. (The fit takes idle as the timed step minus the summed kernel time:
     the timed run syncs at every logged step, and host tracing slows the profiled window's host side.)
The script saves MEASUREMENTS only; predictions and the fit are offline, on CPU, with the planner of the
moment:

    PYTHONPATH=src python3 bench/plan_validate.py --which all --out $OUT      # one H200, ~8.5 min
    PYTHONPATH=src python bench/plan_validate.py --cpu-dry-run --which all --limit 2 --out /tmp/pv
    moemesh plan gpu --gpus 1 --calibrate $OUT/plan_validate.json --json     # fit on 'calibration' only
    python bench/plan_report.py $OUT/plan_validate.json                     # fit + held-out tables

Runs alternate between the two lists, so that a run cut short by the deadline still has some of both;
the calibration list is the longer one, so its tail runs after the last held-out config.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import sys
import tempfile
import time
from pathlib import Path

from child import profile_steps, run_child as run_child_process, timed_train, trainer_kept_open, warm_trainer  # bench/child.py (bench/ is on sys.path when run as a script)

REPO = Path(__file__).resolve().parents[1]
# 3 windows of 4 steps after 4 warm-up steps (two eager, two replays of the captured step); each logged
# step syncs, so windows of 4 (not v3's 2) keep that bubble a smaller part of the step, as in real runs
STEPS, WARMUP, LOG_EVERY = 16, 4, 4
PROFILE_STEPS = 2  # profiled after the timed run, on its Trainer
PROFILE_WARMUP = 2  # only if train() did not hand its Trainer over: a new one, in a warm process
# Measured in session 4: ~13 s per config (child start, build, 16 steps, profile), 329 s for the first 24
# of 26 configs. No run starts after DEADLINE_S and a running child is stopped at STOP_S, so the script
# ends by 8.5 min (one device call); the lists alternate, so a call cut short keeps some of both.
DEADLINE_S, STOP_S = 485, 510
FORMAT = "moemesh plan_validate 4"  # 2: no profile; 3: a per-class profile per run; 4: and whether the step was a CUDA graph


def shape(dim, experts, top_k, ffn, layers, seq, batch, ckpt="none", heads=None, kv=None, vocab=None):
    heads = heads or dim // 128
    o = [f"model.dim={dim}", f"model.num_experts={experts}", f"model.top_k={top_k}", f"model.ffn_dim={ffn}",
         f"model.n_layers={layers}", f"model.n_heads={heads}", f"model.n_kv_heads={kv or max(heads // 4, 1)}",
         f"model.max_seq_len={seq}", f"train.seq_len={seq}", f"train.global_batch={batch}",
         f"train.activation_checkpointing={ckpt}"]
    return o + ([f"model.vocab_size={vocab}"] if vocab else [])


# label -> overrides on the `gpu` preset (vocab 8192 unless set). CALIBRATION is session 3's held-out
# list (plan_validate_v3*.json: evaluated once, so spent as a test); its calibration list is RETIRED now:
# its kernel-class times (format 3) still fit the kernel terms, and the step's idle time is fitted on
# runs of this format only (the step became one CUDA graph). The list's order is the run order.
CALIBRATION = {
    "n-d1024-e64-k8-f512-L4-s4096-b4-moe": shape(1024, 64, 8, 512, 4, 4096, 4, "moe"),
    "n-d512-e16-k2-f512-L8-s2048-b32": shape(512, 16, 2, 512, 8, 2048, 32, heads=4, kv=1),
    "n-d2048-e64-k4-f1024-L4-s8192-b2": shape(2048, 64, 4, 1024, 4, 8192, 2),
    "n-d4096-e8-k1-f14336-L2-s1024-b16-v16k": shape(4096, 8, 1, 14336, 2, 1024, 16, heads=32, kv=8, vocab=16384),
    "n-d3072-e32-k4-f2048-L2-s4096-b4-full": shape(3072, 32, 4, 2048, 2, 4096, 4, "full", kv=8),
    "n-d1536-e48-k6-f640-L6-s2048-b8": shape(1536, 48, 6, 640, 6, 2048, 8, kv=3),
    "n-d768-e8-k1-f3072-L10-s1024-b48-v48k": shape(768, 8, 1, 3072, 10, 1024, 48, heads=6, kv=2, vocab=49152),
    "n-d2048-e16-k2-f4096-L4-s512-b64-moe": shape(2048, 16, 2, 4096, 4, 512, 64, "moe"),
    "n-d1024-e32-k4-f1536-L6-s8192-b2-full": shape(1024, 32, 4, 1536, 6, 8192, 2, "full"),
    "n-d2560-e16-k2-f1792-L4-s2048-b8-v64k": shape(2560, 16, 2, 1792, 4, 2048, 8, heads=20, kv=4, vocab=65536),
    "n-d512-e64-k6-f768-L8-s1024-b32": shape(512, 64, 6, 768, 8, 1024, 32, heads=4, kv=1),
    "n-d4096-e16-k1-f8192-L2-s1024-b8-moe": shape(4096, 16, 1, 8192, 2, 1024, 8, "moe", kv=8),
    "n-d1536-e8-k4-f2560-L6-s4096-b4-v32k": shape(1536, 8, 4, 2560, 6, 4096, 4, kv=3, vocab=32000),
}
# Configs of earlier validations (v1-v3 calibration): no longer run, kept so that no held-out config repeats one.
RETIRED = {
    "d1024-e16-k2-s2048-b16": shape(1024, 16, 2, 2816, 8, 2048, 16),
    "d1024-e8-k1-s1024-b64": shape(1024, 8, 1, 2816, 6, 1024, 64),
    "d2048-e8-k2-s2048-b8": shape(2048, 8, 2, 5632, 4, 2048, 8),
    "d3072-e16-k2-f4096-s2048-b8": shape(3072, 16, 2, 4096, 2, 2048, 8, kv=8),
    "d4096-e16-k1-f4096-s1024-b16": shape(4096, 16, 1, 4096, 2, 1024, 16, kv=8),
    "d1536-e64-k6-f768-s1024-b32-v32k": shape(1536, 64, 6, 768, 4, 1024, 32, vocab=32000),
    "d1024-e16-k4-s2048-b16-moe": shape(1024, 16, 4, 2816, 6, 2048, 16, "moe"),
    "d2048-e8-k2-s4096-b4-full": shape(2048, 8, 2, 5632, 4, 4096, 4, "full"),
    "d1024-e8-k2-s1024-b48-full": shape(1024, 8, 2, 2816, 6, 1024, 48, "full"),
    "d4096-e32-k8-f1024-s2048-b4-moe": shape(4096, 32, 8, 1024, 2, 2048, 4, "moe", kv=8),
    "d2048-e16-k2-f2816-s1024-b32-moe": shape(2048, 16, 2, 2816, 4, 1024, 32, "moe"),
    "h-d1024-e64-k4-f704-L6-s4096-b4-full": shape(1024, 64, 4, 704, 6, 4096, 4, "full"),
    "mixtral-shaped": shape(4096, 8, 2, 14336, 2, 4096, 4, heads=32, kv=8, vocab=32000),
    "h-d2048-e8-k2-f5632-L4-s8192-b2-moe": shape(2048, 8, 2, 5632, 4, 8192, 2, "moe"),
    "fine-grained": shape(2048, 64, 6, 1408, 6, 4096, 4, heads=16, kv=4, vocab=32000),
    "h-d1024-e32-k2-f1024-L8-s2048-b8-v16k": shape(1024, 32, 2, 1024, 8, 2048, 8, vocab=16384),
    "gpu-preset": [],
    "h-d2048-e32-k8-f768-L4-s1024-b16-v64k": shape(2048, 32, 8, 768, 4, 1024, 16, vocab=65536),
    "h-d1024-e16-k1-f2816-L8-s512-b128-full": shape(1024, 16, 1, 2816, 8, 512, 128, "full"),
    "h-d512-e8-k2-f1536-L16-s1024-b64": shape(512, 8, 2, 1536, 16, 1024, 64, heads=4, kv=2),
    "h-d4096-e8-k2-f11008-L2-s2048-b4-v32k": shape(4096, 8, 2, 11008, 2, 2048, 4, heads=32, kv=8, vocab=32000),
    "h-d2048-e16-k4-f1408-L6-s2048-b8-v32k-moe": shape(2048, 16, 4, 1408, 6, 2048, 8, "moe", vocab=32000),
    "h-d3072-e8-k2-f8192-L2-s1024-b16-moe": shape(3072, 8, 2, 8192, 2, 1024, 16, "moe", kv=8),
    "h-d1536-e16-k2-f3072-L6-s2048-b16-full": shape(1536, 16, 2, 3072, 6, 2048, 16, "full"),
    "h-d768-e16-k2-f2048-L12-s1024-b32": shape(768, 16, 2, 2048, 12, 1024, 32, heads=6, kv=2),
    "h-d2560-e8-k1-f6912-L3-s2048-b8-v16k": shape(2560, 8, 1, 6912, 3, 2048, 8, heads=20, kv=4, vocab=16384),
    "h-d1536-e8-k2-f4096-L4-s1024-b24": shape(1536, 8, 2, 4096, 4, 1024, 24),
    "d2048-e32-k4-f1408-s4096-b4": shape(2048, 32, 4, 1408, 4, 4096, 4),
    "d1024-e64-k8-f512-s1024-b16": shape(1024, 64, 8, 512, 6, 1024, 16),
}
# Never measured (session 4): across dim, experts (8-128), top-k, ffn, sequence length (1024-8192), batch,
# layers, vocabulary and checkpointing.
HELDOUT = {
    "v-d1024-e8-k2-f3584-L6-s2048-b16": shape(1024, 8, 2, 3584, 6, 2048, 16),
    "v-d2048-e32-k2-f1536-L4-s4096-b4-moe": shape(2048, 32, 2, 1536, 4, 4096, 4, "moe"),
    "v-d768-e32-k4-f1024-L8-s1024-b32": shape(768, 32, 4, 1024, 8, 1024, 32, heads=6, kv=2),
    "v-d3072-e16-k2-f3072-L3-s2048-b8-v32k": shape(3072, 16, 2, 3072, 3, 2048, 8, kv=8, vocab=32000),
    "v-d1536-e64-k8-f512-L4-s2048-b8": shape(1536, 64, 8, 512, 4, 2048, 8),
    "v-d512-e8-k2-f2048-L12-s4096-b8": shape(512, 8, 2, 2048, 12, 4096, 8, heads=4, kv=2),
    "v-d4096-e8-k2-f6144-L2-s2048-b8-full": shape(4096, 8, 2, 6144, 2, 2048, 8, "full", heads=32, kv=8),
    "v-d2560-e32-k4-f1280-L4-s1024-b16-v32k": shape(2560, 32, 4, 1280, 4, 1024, 16, heads=20, kv=4, vocab=32000),
    "v-d1024-e128-k8-f256-L4-s2048-b8": shape(1024, 128, 8, 256, 4, 2048, 8),
    "v-d2048-e8-k1-f8192-L4-s1024-b16-moe-v16k": shape(2048, 8, 1, 8192, 4, 1024, 16, "moe", vocab=16384),
    "v-d1280-e16-k4-f2048-L6-s8192-b1": shape(1280, 16, 4, 2048, 6, 8192, 1, heads=10, kv=2),
    "v-d3584-e8-k2-f9728-L2-s4096-b2": shape(3584, 8, 2, 9728, 2, 4096, 2, heads=28, kv=4),
    "v-d896-e24-k3-f1152-L10-s1024-b24-v24k": shape(896, 24, 3, 1152, 10, 1024, 24, heads=7, kv=1, vocab=24576),
}
_USED = {**CALIBRATION, **RETIRED}
assert not set(_USED) & set(HELDOUT) and not set(CALIBRATION) & set(RETIRED)
assert not {tuple(o) for o in _USED.values()} & {tuple(o) for o in HELDOUT.values()}
DRY = ["train.device=cpu", "train.dtype=float32", "model.n_layers=1", "model.dim=64", "model.ffn_dim=128",
       "model.n_heads=4", "model.n_kv_heads=2", "model.vocab_size=256", "model.num_experts=4", "model.top_k=2",
       "model.max_seq_len=64", "train.seq_len=64", "train.global_batch=2"]


def selected(which: str) -> list[tuple[str, str, list[str]]]:
    """(set, label, overrides) in run order: the two lists alternate."""
    lists = [("calibration", CALIBRATION)] * (which in ("calibration", "all")) + \
            [("heldout", HELDOUT)] * (which in ("heldout", "all"))
    queues = [[(name, label, o) for label, o in configs.items()] for name, configs in lists]
    out = []
    while any(queues):
        out += [q.pop(0) for q in queues if q]
    return out


def child(args) -> None:
    """One config in this process: the timed run, then the profile; prints one RESULT JSON line."""
    from moemesh.config import load_config

    cfg = load_config("gpu", [*json.loads(args.overrides), f"run.dir={args.run_dir}", "run.progress=false",
                              "run.tensorboard=false", "run.checkpoints=false"])
    with trainer_kept_open() as kept:
        out = timed_train(cfg, args.warmup)
        del out["losses"]
        out["cuda_graph"] = kept[-1].captured if kept else None
        started = time.perf_counter()
        try:
            out["profile"] = profile_classes(cfg, kept)
        except Exception as exc:  # the timed run's numbers stand without it
            out["profile"] = {"error": f"{exc.__class__.__name__}: {str(exc)[:300]}"}
        out["profile_s"] = time.perf_counter() - started
    print("RESULT " + json.dumps(out), flush=True)


def profile_classes(cfg, kept: list) -> dict:
    """GPU time per kernel class of PROFILE_STEPS further steps of the timed run's Trainer (steady state:
    it has run cfg.train.steps steps); a fresh one warmed up for PROFILE_WARMUP steps if train() did not
    hand it over."""
    import gc

    from moemesh.parallel.comm_profile import from_kineto
    from moemesh.plan.kernels import class_profile

    same = bool(kept)
    if same:
        trainer, first = kept[-1], cfg.train.steps + 1
    else:
        gc.collect()  # the timed run's model, before a second one is built
        trainer, first = warm_trainer(cfg, PROFILE_WARMUP), PROFILE_WARMUP + 1
        kept.append(trainer)  # closed with the others
    prof, window_us = profile_steps(trainer, first, PROFILE_STEPS)
    events = from_kineto(prof.profiler.kineto_results.events())
    kernels = [(e.name, e.start_us, e.end_us) for e in events if e.on_device and not e.user_annotation]
    return {**class_profile(kernels, window_us, PROFILE_STEPS), "same_trainer": same}


def run_child(overrides: list[str], run_dir: Path, warmup: int, timeout: float) -> dict:
    env = {**os.environ, "PYTHONPATH": str(REPO / "src"), "PYTHONUNBUFFERED": "1"}
    return run_child_process([__file__, "--child", "--overrides", json.dumps(overrides), "--run-dir", str(run_dir),
                              "--warmup", str(warmup)], env, timeout)


def measure(label: str, overrides: list[str], runs_dir: Path, warmup: int, timeout: float) -> dict:
    """One config's row: its overrides, tokens per step and what the child measured (or its error)."""
    from moemesh.config import load_config

    cfg = load_config("gpu", overrides)
    tokens = cfg.train.global_batch * cfg.train.seq_len
    row = {"overrides": overrides, "tokens_per_step": tokens}
    result = run_child(overrides, runs_dir / label, warmup, timeout)
    row["measured"] = result
    if "profile" in result:
        row["profile"] = result.pop("profile")
    if "tokens_per_s" in result:
        row["tokens_per_s"] = result["tokens_per_s"]
        row["measured_step_ms"] = tokens / result["tokens_per_s"] * 1e3
        row["measured_memory_gib"] = result.get("peak_memory_gib")
    else:
        row["error"] = result.get("error")
    return row


def _classes_line(row: dict) -> str:
    prof = row.get("profile") or {}
    if "classes" not in prof:
        return prof.get("error", "")
    return " ".join(f"{c} {v['ms']:.1f}" for c, v in prof["classes"].items()) + f" idle {prof['idle_ms']:.1f} ms"


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out")
    parser.add_argument("--which", choices=("calibration", "heldout", "all"), default="all")
    parser.add_argument("--cpu-dry-run", action="store_true", help="tiny CPU configs: the plumbing only")
    parser.add_argument("--limit", type=int, default=0, help="at most this many configs per list (0: all)")
    parser.add_argument("--only", default="", help="comma-separated labels to run (default: all selected)")
    parser.add_argument("--deadline-s", type=float, default=DEADLINE_S, help="start no run after this many seconds")
    parser.add_argument("--stop-s", type=float, default=STOP_S, help="stop a running child at this many seconds")
    parser.add_argument("--child", action="store_true")
    parser.add_argument("--overrides", default="[]")
    parser.add_argument("--run-dir")
    parser.add_argument("--warmup", type=int, default=WARMUP)
    parser.add_argument("--runs-dir", help="where the runs' directories go (default: a temporary folder, so that "
                                           "$OUT holds only the JSON)")
    args = parser.parse_args()
    if args.child:
        child(args)
        return 0
    t0 = time.perf_counter()
    import torch

    if not args.out:
        parser.error("--out is required")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    steps, warmup, log_every = (STEPS, WARMUP, LOG_EVERY) if not args.cpu_dry_run else (3, 1, 1)
    cuda = torch.cuda.is_available()
    report = {"format": FORMAT, "command": " ".join(sys.argv),
              "date": datetime.datetime.now(datetime.timezone.utc).isoformat(), "torch": torch.__version__,
              "gpu": torch.cuda.get_device_name() if cuda else None, "cpu_dry_run": args.cpu_dry_run,
              "gpu_memory_gib": torch.cuda.get_device_properties(0).total_memory / 2**30 if cuda else None,
              "steps": steps, "warmup_steps": warmup, "log_every": log_every, "cpus": os.cpu_count(),
              "profile_warmup_steps": PROFILE_WARMUP, "profile_steps": PROFILE_STEPS,
              "layout": [1, 1, 1], "which": args.which, "runs": {}}

    def save():
        report["script_s"] = time.perf_counter() - t0
        (out / "plan_validate.json").write_text(json.dumps(report, indent=1))

    runs_dir = Path(args.runs_dir) if args.runs_dir else Path(tempfile.mkdtemp(prefix="plan_validate_"))
    only = set(filter(None, args.only.split(",")))
    todo, per_set = [], {}
    for name, label, o in selected(args.which):
        if (only and label not in only) or (args.limit and per_set.get(name, 0) >= args.limit):
            continue
        per_set[name] = per_set.get(name, 0) + 1
        todo.append((name, label, [*o, f"train.steps={steps}", f"run.log_every={log_every}",
                                   *(DRY if args.cpu_dry_run else [])]))
    for name, label, overrides in todo:
        elapsed = time.perf_counter() - t0
        if elapsed > args.deadline_s:
            report["runs"][label] = {"set": name, "overrides": overrides,
                                     "error": f"skipped: {elapsed:.0f} s into the script (deadline {args.deadline_s:.0f} s)"}
            print(label, report["runs"][label]["error"], flush=True)
            continue
        row = {"set": name, **measure(label, overrides, runs_dir, warmup,
                                      timeout=max(30.0, args.stop_s - elapsed))}
        report["runs"][label] = row
        print(f"[{time.perf_counter() - t0:5.0f} s] {name} {label}: {row.get('measured_step_ms', float('nan')):.1f} ms "
              f"{row.get('measured_memory_gib') or float('nan'):.2f} GiB {row.get('error', '')}", _classes_line(row),
              row["measured"].get("stderr", "")[-1500:], flush=True)
        save()
    save()
    ok = sum("measured_step_ms" in r for r in report["runs"].values())
    print(f"{ok} of {len(report['runs'])} configs measured in {report['script_s']:.0f} s -> {out / 'plan_validate.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
