"""Held-out validation of `moemesh plan` on one GPU (issue 9), in one device call:

for each of the configs below (the `gpu` preset with overrides; none of them is a calibration run of
bench/results/train_e2e.json), one short training run in a child process (bench/train_e2e.py's pattern:
`moemesh.train.loop.train` in-process, `run.checkpoints=false`, tokens/s = median of the logged windows
after warm-up from metrics.jsonl, peak = `torch.cuda.max_memory_allocated`), and the planner's own
prediction for the same config at layout (dp, ep, tp) = (1, 1, 1) on an h200 (`plan.search.enumerate_plans`,
the function `moemesh plan` ranks; the candidate with the config's activation checkpointing mode).

    PYTHONPATH=src python3 bench/plan_validate.py --out $OUT                    # one H200, ~4 min
    PYTHONPATH=src python bench/plan_validate.py --cpu-dry-run --out /tmp/pv    # plumbing only

Writes $OUT/plan_validate.json in the format `moemesh plan --calibrate` reads (a 'gpu' and 'runs', each
run with its 'overrides' and 'tokens_per_s'): per config measured and predicted step time and peak memory
with relative errors (predicted / measured - 1); a summary with mean absolute and worst errors and the
agreement of the rankings by predicted and measured step time (Spearman and pairwise).
"""

from __future__ import annotations

import argparse
import datetime
import itertools
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

from child import run_child as run_child_process  # bench/child.py (bench/ is on sys.path when run as a script)

REPO = Path(__file__).resolve().parents[1]
STEPS, WARMUP, LOG_EVERY = 18, 8, 2
DEADLINE_S = 285  # start no new run after this many seconds of the script (one device call, ~5 min)


def _shape(dim, experts, top_k, ffn, layers, seq, batch, ckpt="none", heads=None, kv=None, vocab=None):
    heads = heads or dim // 128
    o = [f"model.dim={dim}", f"model.num_experts={experts}", f"model.top_k={top_k}", f"model.ffn_dim={ffn}",
         f"model.n_layers={layers}", f"model.n_heads={heads}", f"model.n_kv_heads={kv or max(heads // 4, 1)}",
         f"model.max_seq_len={seq}", f"train.seq_len={seq}", f"train.global_batch={batch}",
         f"train.activation_checkpointing={ckpt}"]
    return o + ([f"model.vocab_size={vocab}"] if vocab else [])


# label -> overrides on the `gpu` preset (vocab 8192 unless set). Calibration used the preset itself
# (d1024 e8 k2 f2816 L8 s1024 b32), a Mixtral shape (d4096 e8 k2 f14336 L2 s4096 b4, with none/moe/full)
# and a fine-grained one (d2048 e64 k6 f1408 L6 s4096 b4): every config here differs from all three.
CONFIGS = {
    "d1024-e16-k2-s2048-b16": _shape(1024, 16, 2, 2816, 8, 2048, 16),
    "d1024-e8-k1-s1024-b64": _shape(1024, 8, 1, 2816, 6, 1024, 64),
    "d1024-e64-k8-f512-s1024-b16": _shape(1024, 64, 8, 512, 6, 1024, 16),
    "d2048-e8-k2-s2048-b8": _shape(2048, 8, 2, 5632, 4, 2048, 8),
    "d2048-e32-k4-f1408-s4096-b4": _shape(2048, 32, 4, 1408, 4, 4096, 4),
    "d3072-e16-k2-f4096-s2048-b8": _shape(3072, 16, 2, 4096, 2, 2048, 8, kv=8),
    "d4096-e16-k1-f4096-s1024-b16": _shape(4096, 16, 1, 4096, 2, 1024, 16, kv=8),
    "d1536-e64-k6-f768-s1024-b32-v32k": _shape(1536, 64, 6, 768, 4, 1024, 32, vocab=32000),
    "d1024-e16-k4-s2048-b16-moe": _shape(1024, 16, 4, 2816, 6, 2048, 16, "moe"),
    "d2048-e8-k2-s4096-b4-full": _shape(2048, 8, 2, 5632, 4, 4096, 4, "full"),
    "d1024-e8-k2-s1024-b48-full": _shape(1024, 8, 2, 2816, 6, 1024, 48, "full"),
    "d4096-e32-k8-f1024-s2048-b4-moe": _shape(4096, 32, 8, 1024, 2, 2048, 4, "moe", kv=8),
    "d2048-e16-k2-f2816-s1024-b32-moe": _shape(2048, 16, 2, 2816, 4, 1024, 32, "moe"),
}
DRY = ["train.device=cpu", "train.dtype=float32", "model.n_layers=1", "model.dim=64", "model.ffn_dim=128",
       "model.n_heads=4", "model.n_kv_heads=2", "model.vocab_size=256", "model.num_experts=4", "model.top_k=2",
       "model.max_seq_len=64", "train.seq_len=64", "train.global_batch=2"]


def child(args) -> None:
    """One training run in this process; prints one RESULT JSON line."""
    import torch

    from moemesh.config import load_config
    from moemesh.train.loop import train

    cfg = load_config("gpu", [*json.loads(args.overrides), f"run.dir={args.run_dir}", "run.progress=false",
                              "run.tensorboard=false", "run.checkpoints=false"])
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    started = time.perf_counter()
    summary = train(cfg)
    total = time.perf_counter() - started
    records = [json.loads(line) for line in open(Path(args.run_dir) / "metrics.jsonl")]
    steady = [r["tokens_per_s"] for r in records if r["step"] > args.warmup] or [records[-1]["tokens_per_s"]]
    out = {"tokens_per_s": statistics.median(steady), "windows": len(steady),
           "tokens_per_s_windows": steady, "startup_s": total - summary["elapsed_s"],
           "peak_memory_gib": torch.cuda.max_memory_allocated() / 2**30 if torch.cuda.is_available() else None,
           "final_lm_loss": summary["final_lm_loss"]}
    print("RESULT " + json.dumps(out), flush=True)


def run_child(overrides: list[str], run_dir: Path, warmup: int, timeout: float) -> dict:
    env = {**os.environ, "PYTHONPATH": str(REPO / "src"), "PYTHONUNBUFFERED": "1"}
    return run_child_process([__file__, "--child", "--overrides", json.dumps(overrides), "--run-dir", str(run_dir),
                            "--warmup", str(warmup)], env, timeout)


def predict(cfg) -> dict:
    """The planner's candidate for this config at (1, 1, 1) on an h200, as `moemesh plan --gpus 1` ranks it."""
    from moemesh.plan.cost import GPUS, H200_CONSTANTS
    from moemesh.plan.memory import GIB
    from moemesh.plan.search import IMBALANCE, enumerate_plans

    cands = [c for c in enumerate_plans(cfg, 1, 8, GPUS["h200"], H200_CONSTANTS, IMBALANCE)
             if (c.dp, c.ep, c.tp) == (1, 1, 1) and c.recompute == cfg.train.activation_checkpointing]
    (c,) = cands
    return {"step_ms": c.step_s * 1e3, "memory_gib": max(c.memory, c.build) / GIB,
            "train_memory_gib": c.memory / GIB, "build_memory_gib": c.build / GIB,
            "terms_ms": {k: v * 1e3 for k, v in c.terms.items()}, "bottleneck": c.bottleneck, "fits": c.fits}


def _ranks(xs):
    order = sorted(range(len(xs)), key=lambda i: xs[i])
    r = [0.0] * len(xs)
    for rank, i in enumerate(order):
        r[i] = float(rank)
    return r


def summarize(rows: dict) -> dict:
    ok = {k: r for k, r in rows.items() if "err_step" in r}
    if not ok:
        return {"n": 0}
    es = [r["err_step"] for r in ok.values()]
    em = [r["err_memory"] for r in ok.values() if r.get("err_memory") is not None]
    out = {"n": len(ok), "step_mae": statistics.fmean(abs(e) for e in es), "step_mean_signed": statistics.fmean(es),
           "step_worst": max(es, key=abs), "step_worst_config": max(ok, key=lambda k: abs(ok[k]["err_step"]))}
    if em:
        out.update({"memory_mae": statistics.fmean(abs(e) for e in em), "memory_mean_signed": statistics.fmean(em),
                    "memory_worst": max(em, key=abs),
                    "memory_worst_config": max((k for k in ok if ok[k].get("err_memory") is not None),
                                               key=lambda k: abs(ok[k]["err_memory"]))})
    meas = [r["measured_step_ms"] for r in ok.values()]
    pred = [r["predicted_step_ms"] for r in ok.values()]
    n = len(meas)
    if n >= 2:
        rm, rp = _ranks(meas), _ranks(pred)
        out["spearman_step"] = 1 - 6 * sum((a - b) ** 2 for a, b in zip(rm, rp)) / (n * (n * n - 1))
        pairs = list(itertools.combinations(range(n), 2))
        agree = sum((meas[i] - meas[j]) * (pred[i] - pred[j]) > 0 for i, j in pairs)
        out["pairwise_agreement_step"] = agree / len(pairs)
        names = list(ok)
        out["discordant_pairs"] = [[names[i], names[j]] for i, j in pairs
                                   if (meas[i] - meas[j]) * (pred[i] - pred[j]) <= 0]
    out["targets"] = {"step_mae_max": 0.05, "step_worst_max": 0.15, "memory_worst_max": 0.10}
    out["met"] = {"step_mae": out["step_mae"] <= 0.05, "step_worst": abs(out["step_worst"]) <= 0.15,
                  "memory_worst": bool(em) and abs(out["memory_worst"]) <= 0.10}
    return out


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out")
    parser.add_argument("--cpu-dry-run", action="store_true")
    parser.add_argument("--child", action="store_true")
    parser.add_argument("--overrides", default="[]")
    parser.add_argument("--run-dir")
    parser.add_argument("--warmup", type=int, default=WARMUP)
    parser.add_argument("--runs-dir", help="where the runs' directories go (default: a temporary folder, so that "
                                           "$OUT holds only the JSON: the device call returns at most 8 files)")
    parser.add_argument("--only", default="", help="comma-separated labels to run (default: all)")
    args = parser.parse_args()
    if args.child:
        child(args)
        return 0
    t0 = time.perf_counter()
    import torch

    from moemesh.config import load_config

    if not args.out:
        parser.error("--out is required")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    steps, warmup, log_every = (STEPS, WARMUP, LOG_EVERY) if not args.cpu_dry_run else (4, 1, 1)
    dry = DRY if args.cpu_dry_run else []
    report = {"command": " ".join(sys.argv), "date": datetime.datetime.now(datetime.timezone.utc).isoformat(),
              "torch": torch.__version__, "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
              "cpu_dry_run": args.cpu_dry_run, "steps": steps, "warmup_steps": warmup, "log_every": log_every,
              "gpu_memory_gib": (torch.cuda.get_device_properties(0).total_memory / 2**30
                                 if torch.cuda.is_available() else None), "cpus": os.cpu_count(),
              "layout": [1, 1, 1], "planner_gpu": "h200", "runs": {}, "summary": {}}

    def save():
        report["summary"] = summarize(report["runs"])
        report["script_s"] = time.perf_counter() - t0
        (out / "plan_validate.json").write_text(json.dumps(report, indent=1))

    runs_dir = Path(args.runs_dir) if args.runs_dir else Path(tempfile.mkdtemp(prefix="plan_validate_"))
    only = set(filter(None, args.only.split(",")))
    todo = [(label, [*o, f"train.steps={steps}", f"run.log_every={log_every}", *dry])
            for label, o in CONFIGS.items() if not only or label in only]
    preds = {}
    for label, overrides in todo:  # predictions first: CPU only (meta-device model)
        preds[label] = predict(load_config("gpu", overrides))
    print(f"predictions done at {time.perf_counter() - t0:.1f} s", flush=True)
    for label, overrides in todo:
        elapsed = time.perf_counter() - t0
        cfg = load_config("gpu", overrides)
        tokens = cfg.train.global_batch * cfg.train.seq_len
        row = {"overrides": overrides, "tokens_per_step": tokens, "predicted": preds[label],
               "predicted_step_ms": preds[label]["step_ms"], "predicted_memory_gib": preds[label]["memory_gib"]}
        if elapsed > DEADLINE_S:
            row["error"] = f"skipped: {elapsed:.0f} s into the script (deadline {DEADLINE_S} s)"
            report["runs"][label] = row
            print(label, row["error"], flush=True)
            save()
            continue
        result = run_child(overrides, runs_dir / label, warmup, timeout=max(30.0, DEADLINE_S + 60 - elapsed))
        row["measured"] = result
        if "tokens_per_s" in result:
            row["tokens_per_s"] = result["tokens_per_s"]
            row["measured_step_ms"] = tokens / result["tokens_per_s"] * 1e3
            row["err_step"] = row["predicted_step_ms"] / row["measured_step_ms"] - 1
            if result.get("peak_memory_gib"):
                row["measured_memory_gib"] = result["peak_memory_gib"]
                row["err_memory"] = row["predicted_memory_gib"] / row["measured_memory_gib"] - 1
        else:
            row["error"] = result.get("error")
        report["runs"][label] = row
        print(f"{label}: measured {row.get('measured_step_ms', float('nan')):.1f} ms "
              f"{row.get('measured_memory_gib') or float('nan'):.2f} GiB, predicted {row['predicted_step_ms']:.1f} ms "
              f"{row['predicted_memory_gib']:.2f} GiB, err step {row.get('err_step', float('nan')):+.1%} "
              f"mem {row.get('err_memory') if row.get('err_memory') is not None else float('nan'):+.1%} "
              f"[{time.perf_counter() - t0:.0f} s]", result.get("stderr", "")[-1500:], flush=True)
        save()
    save()
    print(json.dumps({k: v for k, v in report.items() if k != "runs"}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
