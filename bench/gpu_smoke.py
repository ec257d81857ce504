"""GPU smoke test (issue 2): the `gpu` preset trains in bf16 through torch._grouped_mm on one H200.

One call does everything, so it fits a single lease of the device machine:
  1. environment: torch version, GPU name and capability (asserts CUDA is there);
  2. grouped GEMM: `grouped_mm` (torch._grouped_mm when `grouped_mm_supported`) against the per-expert
     `grouped_mm_loop`, forward and backward, bf16, preset shapes, random counts with a zero-count expert.
     Each case runs in its own child process: a device-side assert (e.g. on unaligned group offsets)
     poisons the CUDA context, and must neither hide the failure nor kill the rest of the smoke test;
  3. fast path taken: `grouped_mm_supported` on tensors of the preset's shapes, and a short training run
     with `grouped_mm_loop` and `torch._grouped_mm` wrapped by call counters (loop calls must be 0);
  4. the training run itself, in-process (`moemesh.train.loop.train`, what `moemesh train gpu` runs):
     loss must fall; tokens/s = median of the logged windows after warm-up; peak memory;
  5. model FLOPs per token (6 x active matmul params + causal attention) and MFU against the measured
     780 TFLOP/s bf16 matmul ceiling (/work/shared/ENV_NOTES.md, 8192^3 on an H200).

Usage (device):  PYTHONPATH=src python3 bench/gpu_smoke.py --out $OUT
Usage (CPU dry run of the plumbing, tiny preset, fp32):  PYTHONPATH=src python bench/gpu_smoke.py --cpu-dry-run --out /tmp/x
Writes gpu_smoke.json (and metrics.jsonl, log) under --out; on a real run also bench/results/gpu_smoke.json.
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import statistics
import subprocess
import sys
import time
import traceback
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "src"))

import moemesh.model.grouped as grouped  # noqa: E402
from moemesh.config import load_config  # noqa: E402
from moemesh.model.transformer import Transformer  # noqa: E402

BF16_PEAK_FLOPS = 780e12  # measured bf16 matmul 8192^3 on an H200 (ENV_NOTES.md, 2026-11-28)
REL_TOL = 1e-2
LOSS_DROP = 1.0  # last logged lm loss must be at least this far below the first


# ---------------------------------------------------------------------------------------------------
# grouped GEMM check (runs in a child process per case)

def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


def gmm_case(device: str, dtype_name: str, dim_in: int, dim_out: int, counts: list[int], seed: int,
             pad_to: int = 0) -> dict:
    """grouped_mm vs grouped_mm_loop (and an fp32 reference) on one set of expert row counts.

    pad_to > 0: each group is padded with zero rows up to a multiple of pad_to before the GEMM (the
    fix one would apply if unaligned offsets fail); only the real rows are compared.
    """
    dtype = getattr(torch, dtype_name)
    gen = torch.Generator(device=device).manual_seed(seed)
    num_experts = len(counts)
    rows = sum(counts)
    x = torch.randn(rows, dim_in, device=device, dtype=dtype, generator=gen)
    w = (torch.randn(num_experts, dim_in, dim_out, device=device, dtype=dtype, generator=gen) / math.sqrt(dim_in))
    g = torch.randn(rows, dim_out, device=device, dtype=dtype, generator=gen)
    counts_t = torch.tensor(counts, device=device)
    result = {"counts": counts, "dim_in": dim_in, "dim_out": dim_out, "dtype": dtype_name, "pad_to": pad_to,
              "offsets_mod8": [int(o) % 8 for o in torch.cumsum(counts_t, 0).tolist()],
              "supported": grouped.grouped_mm_supported(x, w)}

    def run(fn, x_in, w_in, cnts):
        x_in = x_in.detach().clone().requires_grad_(True)
        w_in = w_in.detach().clone().requires_grad_(True)
        if pad_to:
            padded = [(c + pad_to - 1) // pad_to * pad_to for c in cnts]
            keep = torch.cat([torch.arange(c, device=device) + s for c, s in
                              zip(cnts, [0] + list(torch.tensor(padded).cumsum(0).tolist()[:-1]))])
            xp = x_in.new_zeros(sum(padded), x_in.shape[1]).index_copy(0, keep, x_in)
            offs = torch.tensor(padded, device=device).cumsum(0).to(torch.int32)
            y = fn(xp, w_in, offs)[keep]
        else:
            offs = torch.tensor(cnts, device=device).cumsum(0).to(torch.int32)
            y = fn(x_in, w_in, offs)
        y.backward(g)
        if device == "cuda":
            torch.cuda.synchronize()
        return y.detach(), x_in.grad, w_in.grad

    fast = run(grouped.grouped_mm, x, w, counts)
    loop = run(grouped.grouped_mm_loop, x, w, counts)
    ref = run(grouped.grouped_mm_loop, x.float(), w.float(), counts)  # fp32 reference on the same inputs
    for name, i in (("y", 0), ("dx", 1), ("dw", 2)):
        result[f"rel_{name}_fast_vs_loop"] = _rel(fast[i], loop[i])
        result[f"rel_{name}_fast_vs_fp32"] = _rel(fast[i], ref[i])
        result[f"rel_{name}_loop_vs_fp32"] = _rel(loop[i], ref[i])
        result[f"finite_{name}"] = bool(torch.isfinite(fast[i]).all())
    # the zero-count expert's weight gradient must be exactly zero on both paths
    zero = [e for e, c in enumerate(counts) if c == 0]
    result["zero_expert_dw_abs_max"] = max((float(fast[2][e].abs().max()) for e in zero), default=0.0)
    # y.sum().backward(): stride-0 incoming gradient (what _ContiguousGrad guards)
    xs = x.detach().clone().requires_grad_(True)
    grouped.grouped_mm(xs, w, torch.cumsum(counts_t, 0).to(torch.int32)).sum().backward()
    result["sum_backward_ok"] = bool(torch.isfinite(xs.grad).all())
    errs = [result[f"rel_{n}_fast_vs_loop"] for n in ("y", "dx", "dw")]
    result["ok"] = all(e < REL_TOL for e in errs) and all(result[f"finite_{n}"] for n in ("y", "dx", "dw")) \
        and result["zero_expert_dw_abs_max"] == 0.0 and result["sum_backward_ok"]
    return result


def run_gmm_case_child(spec: dict, timeout: int = 180) -> dict:
    """Run gmm_case in a fresh process; a crash (device assert, RuntimeError) is reported, not raised."""
    cmd = [sys.executable, str(Path(__file__).resolve()), "--gmm-case", json.dumps(spec)]
    t0 = time.perf_counter()
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout,
                              env={**os.environ, "PYTHONPATH": str(REPO / "src")})
    except subprocess.TimeoutExpired:
        return {**spec, "ok": False, "error": f"timed out after {timeout} s"}
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("GMM_RESULT ")]
    if proc.returncode == 0 and lines:
        out = json.loads(lines[-1][len("GMM_RESULT "):])
    else:
        out = {**spec, "ok": False, "returncode": proc.returncode,
               "error": (proc.stderr or proc.stdout)[-3000:]}
    out["wall_s"] = round(time.perf_counter() - t0, 2)
    return out


def gmm_checks(device: str, dtype_name: str, dim: int, ffn: int, num_experts: int) -> dict:
    gen = torch.Generator().manual_seed(1234)
    # arbitrary (unaligned) counts, one expert with none, a few tiny groups
    rnd = torch.randint(1, 1500, (num_experts,), generator=gen).tolist()
    rnd[1], rnd[-2], rnd[-1] = 0, 3, 17
    aligned = [(c + 15) // 16 * 16 for c in rnd]  # same, rounded to multiples of 16 (zero stays zero)
    cases = {
        "aligned16_up": dict(counts=aligned, dim_in=dim, dim_out=ffn),
        "random_up": dict(counts=rnd, dim_in=dim, dim_out=ffn),
        "random_down": dict(counts=rnd, dim_in=ffn, dim_out=dim),
    }
    results = {}
    for i, (name, spec) in enumerate(cases.items()):
        spec = {**spec, "device": device, "dtype_name": dtype_name, "seed": 100 + i}
        results[name] = run_gmm_case_child(spec)
        print(f"[gmm] {name}: ok={results[name]['ok']} " + _gmm_line(results[name]), flush=True)
    if not (results["random_up"]["ok"] and results["random_down"]["ok"]):
        # show whether padding every group to a multiple of 8 / 16 rows is the fix
        for pad in (8, 16):
            spec = {**cases["random_up"], "device": device, "dtype_name": dtype_name, "seed": 200 + pad,
                    "pad_to": pad}
            name = f"random_up_pad{pad}"
            results[name] = run_gmm_case_child(spec)
            print(f"[gmm] {name}: ok={results[name]['ok']} " + _gmm_line(results[name]), flush=True)
    return results


def _gmm_line(r: dict) -> str:
    if "error" in r:
        return "ERROR: " + r["error"].strip().splitlines()[-1][:300] if r["error"].strip() else "ERROR (no output)"
    return (f"rel fast-vs-loop y={r['rel_y_fast_vs_loop']:.2e} dx={r['rel_dx_fast_vs_loop']:.2e} "
            f"dw={r['rel_dw_fast_vs_loop']:.2e}; vs fp32 fast y={r['rel_y_fast_vs_fp32']:.2e} "
            f"loop y={r['rel_y_loop_vs_fp32']:.2e}; supported={r['supported']}")


# ---------------------------------------------------------------------------------------------------
# model FLOPs

def flops_per_token(cfg) -> dict:
    """Training FLOPs per token: 6 x active matmul params (embedding lookup excluded, experts counted
    top_k / num_experts) + attention scores and values: 12 * L * S * D non-causal, half of it causal."""
    m = cfg.model
    with torch.device("meta"):
        model = Transformer(m)
    total = sum(p.numel() for p in model.parameters())
    active = 0
    for name, p in model.named_parameters():
        if name.startswith("tok_embeddings") or p.ndim < 2:
            continue  # lookup, norms
        if ".experts." in name:
            active += p.numel() * m.top_k // m.num_experts
        else:
            active += p.numel()
    seq = cfg.train.seq_len
    attn_full = 12 * m.n_layers * seq * m.dim
    return {"params_total": total, "params_active_matmul": active,
            "flops_per_token": 6 * active + attn_full // 2, "flops_per_token_noncausal_attn": 6 * active + attn_full}


# ---------------------------------------------------------------------------------------------------
# training

class CallCounter:
    def __init__(self, fn):
        self.fn, self.calls, self.offsets = fn, 0, []

    def __call__(self, *args, **kwargs):
        self.calls += 1
        offs = kwargs.get("offs", args[2] if len(args) > 2 else None)
        if offs is not None and len(self.offsets) < 64:
            self.offsets.append([int(o) for o in offs.tolist()])
        return self.fn(*args, **kwargs)


def count_fast_path(preset: str, overrides: list[str], workdir: Path, steps: int) -> dict:
    """A few training steps with grouped_mm_loop and torch._grouped_mm wrapped by counters."""
    from moemesh.train.loop import train

    cfg = load_config(preset, overrides + [f"run.dir={workdir / 'count_run'}", f"train.steps={steps}",
                                           "run.progress=false", "run.tensorboard=false", f"run.log_every={steps}"])
    loop_counter = CallCounter(grouped.grouped_mm_loop)
    fast_counter = CallCounter(torch._grouped_mm) if hasattr(torch, "_grouped_mm") else None
    orig_loop, orig_fast = grouped.grouped_mm_loop, getattr(torch, "_grouped_mm", None)
    grouped.grouped_mm_loop = loop_counter
    if fast_counter is not None:
        torch._grouped_mm = fast_counter
    try:
        train(cfg)
    finally:
        grouped.grouped_mm_loop = orig_loop
        if orig_fast is not None:
            torch._grouped_mm = orig_fast
    offs = fast_counter.offsets if fast_counter else []
    unaligned = sum(1 for o in offs for v in o if v % 8)
    return {"steps": steps, "grouped_mm_loop_calls": loop_counter.calls,
            "torch_grouped_mm_calls": fast_counter.calls if fast_counter else 0,
            "expected_forward_calls": 3 * cfg.model.n_layers * steps,
            "offsets_sampled": len(offs), "offsets_not_multiple_of_8": unaligned,
            "first_offsets": offs[0] if offs else None}


def read_metrics(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=os.environ.get("OUT", "bench/results/gpu_smoke_out"))
    ap.add_argument("--workdir", default="/tmp/moemesh_gpu_smoke")
    ap.add_argument("--cpu-dry-run", action="store_true", help="tiny preset on CPU, fp32: plumbing only")
    ap.add_argument("--steps", type=int, default=None, help="override train.steps")
    ap.add_argument("--gmm-case", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()

    if args.gmm_case is not None:  # child process
        result = gmm_case(**json.loads(args.gmm_case))
        print("GMM_RESULT " + json.dumps(result), flush=True)
        return 0

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    workdir = Path(args.workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    dry = args.cpu_dry_run
    preset, overrides = ("tiny", ["train.device=cpu", "train.dtype=float32"]) if dry else ("gpu", [])
    if args.steps:
        overrides.append(f"train.steps={args.steps}")
    device, dtype_name = ("cpu", "float32") if dry else ("cuda", "bfloat16")
    cfg = load_config(preset, overrides)

    report: dict = {
        "command": " ".join([os.path.basename(sys.executable)] + sys.argv),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "dry_run": dry, "preset": preset, "overrides": overrides, "torch": torch.__version__,
        "python": sys.version.split()[0], "config": cfg.to_dict(), "errors": [],
    }
    if not dry:
        assert torch.cuda.is_available(), "CUDA is not available"
        props = torch.cuda.get_device_properties(0)
        report.update(gpu=torch.cuda.get_device_name(0), capability=list(torch.cuda.get_device_capability(0)),
                      gpu_mem_gib=round(props.total_memory / 2**30, 1), sms=props.multi_processor_count,
                      cuda=torch.version.cuda)
    else:
        report["gpu"] = None
    print(f"torch {torch.__version__} cuda {torch.version.cuda} gpu {report['gpu']} "
          f"cap {report.get('capability')}", flush=True)

    def save():
        text = json.dumps(report, indent=2) + "\n"
        (out / "gpu_smoke.json").write_text(text)
        if not dry:
            dest = REPO / "bench" / "results" / "gpu_smoke.json"
            dest.parent.mkdir(parents=True, exist_ok=True)
            dest.write_text(text)

    m = cfg.model
    # -- 1. grouped GEMM correctness, one child process per case
    try:
        report["grouped_mm_check"] = gmm_checks(device, dtype_name, m.dim, m.ffn_dim, m.num_experts)
    except Exception:
        report["errors"].append("gmm_checks: " + traceback.format_exc())
    save()

    # -- 2. is the fast path the one taken?
    amp = getattr(torch, dtype_name)
    probe_x = torch.empty(4096, m.dim, device=device, dtype=amp)
    probe_h = torch.empty(4096, m.ffn_dim, device=device, dtype=amp)
    w_up = torch.empty(m.num_experts, m.dim, m.ffn_dim, device=device, dtype=amp)
    w_down = torch.empty(m.num_experts, m.ffn_dim, m.dim, device=device, dtype=amp)
    report["grouped_mm_supported"] = {"up": grouped.grouped_mm_supported(probe_x, w_up),
                                      "down": grouped.grouped_mm_supported(probe_h, w_down)}
    del probe_x, probe_h, w_up, w_down
    try:
        report["fast_path_count"] = count_fast_path(preset, overrides, workdir, steps=3)
        print(f"[fast path] {report['fast_path_count']}", flush=True)
    except Exception:
        report["errors"].append("count_fast_path: " + traceback.format_exc())
        print(report["errors"][-1], flush=True)
    save()

    # -- 3. host-side data cost per step (the synthetic source samples on the CPU, in the loop)
    from moemesh.train.loop import preflight, train

    source = preflight(cfg)
    t0 = time.perf_counter()
    for step in range(1, 4):
        source.global_batch(step, cfg.train.global_batch, cfg.train.seq_len)
    report["host_data_ms_per_step"] = round(1000 * (time.perf_counter() - t0) / 3, 2)

    # -- 4. the training run
    run_dir = workdir / "run"
    train_cfg = load_config(preset, overrides + [f"run.dir={run_dir}", "run.progress=false"])
    if not dry:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    try:
        t0 = time.perf_counter()
        summary = train(train_cfg)
        report["train_wall_s"] = round(time.perf_counter() - t0, 2)
        report["summary"] = summary
    except Exception:
        report["errors"].append("train: " + traceback.format_exc())
        print(report["errors"][-1], flush=True)
    if not dry:
        report["peak_mem_allocated_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
        report["peak_mem_reserved_gib"] = round(torch.cuda.max_memory_reserved() / 2**30, 2)
    metrics_path = run_dir / "metrics.jsonl"
    if metrics_path.exists():
        records = read_metrics(metrics_path)
        (out / "metrics.jsonl").write_text(metrics_path.read_text())
        compact = [{k: r[k] for k in ("step", "loss", "lm_loss", "aux_loss", "grad_norm", "tokens_per_s")}
                   for r in records]
        report["log"] = compact
        warm = [r["tokens_per_s"] for r in records if r["step"] > 2 * train_cfg.run.log_every] or \
            [r["tokens_per_s"] for r in records]
        tps = statistics.median(warm)
        first, last = records[0]["lm_loss"], records[-1]["lm_loss"]
        fl = flops_per_token(train_cfg)
        report.update(
            tokens_per_s=round(tps, 1), tokens_per_s_windows_used=len(warm),
            tokens_per_s_whole_run=round(report.get("summary", {}).get("tokens_per_s", float("nan")), 1),
            loss_first=first, loss_first_step=records[0]["step"], loss_last=last,
            loss_last_step=records[-1]["step"], loss_at_init_uniform=math.log(train_cfg.model.vocab_size),
            entropy_floor=source.entropy_floor, loss_fell=last < first - LOSS_DROP,
            flops=fl, peak_flops=BF16_PEAK_FLOPS,
            mfu=round(fl["flops_per_token"] * tps / BF16_PEAK_FLOPS, 4),
            mfu_noncausal_attn=round(fl["flops_per_token_noncausal_attn"] * tps / BF16_PEAK_FLOPS, 4),
            achieved_tflops=round(fl["flops_per_token"] * tps / 1e12, 1),
        )
    else:
        report["errors"].append("no metrics.jsonl written")
    gmm = report.get("grouped_mm_check", {})
    fp = report.get("fast_path_count", {})
    report["checks"] = {
        "grouped_mm_matches_loop": bool(gmm) and all(r.get("ok") for k, r in gmm.items() if "pad" not in k),
        "fast_path_supported_for_preset": all(report["grouped_mm_supported"].values()),
        "fast_path_taken": fp.get("grouped_mm_loop_calls") == 0 and fp.get("torch_grouped_mm_calls", 0) > 0,
        "loss_fell": report.get("loss_fell", False),
        "no_errors": not report["errors"],
    }
    report["ok"] = all(report["checks"].values())
    save()

    print("\n==== gpu smoke ====")
    print(f"gpu {report['gpu']}  torch {torch.__version__}")
    for name, r in gmm.items():
        print(f"grouped_mm {name:14s} ok={r.get('ok')}  {_gmm_line(r)}")
    print(f"grouped_mm_supported {report['grouped_mm_supported']}  fast path {fp}")
    if "tokens_per_s" in report:
        print(f"tokens/s {report['tokens_per_s']:.0f} (median of {report['tokens_per_s_windows_used']} windows; "
              f"whole run {report['tokens_per_s_whole_run']:.0f})  host data {report['host_data_ms_per_step']} ms/step")
        print(f"flops/token {report['flops']['flops_per_token'] / 1e9:.3f} G  achieved "
              f"{report['achieved_tflops']} TFLOP/s  MFU {100 * report['mfu']:.1f}% of 780 TFLOP/s "
              f"(non-causal attn count {100 * report['mfu_noncausal_attn']:.1f}%)")
        print(f"lm loss {report['loss_first']:.3f} (step {report['loss_first_step']}) -> {report['loss_last']:.3f} "
              f"(step {report['loss_last_step']}); ln V {report['loss_at_init_uniform']:.3f}; "
              f"entropy floor {report['entropy_floor']:.3f}")
    if not dry:
        print(f"peak mem allocated {report['peak_mem_allocated_gib']} GiB reserved {report['peak_mem_reserved_gib']} GiB")
    print(f"checks {report['checks']}  errors {len(report['errors'])}")
    print("OK" if report["ok"] else "FAILED")
    return 0 if report["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
