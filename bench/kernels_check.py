"""The Triton kernels of moemesh.kernels on the GPU (issue 7), in one short device call: for each kernel
at the shapes of the benchmark configs, bf16, its output and input gradients against the PyTorch code it
replaces (relative error in the Frobenius norm, and the PyTorch code's own error against an fp64 reference,
for scale), and
forward+backward time of both (CUDA events, median of 20 after 5 warm-up).

    PYTHONPATH=src python3 bench/kernels_check.py --out $OUT        # writes kernels_check.json
"""

from __future__ import annotations

import argparse
import datetime
import json
import statistics
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "src"))

from moemesh.kernels import gather_sum, rmsnorm, rotary, swiglu  # noqa: E402
from moemesh.model.layers import RMSNorm, apply_rotary, rotary_tables  # noqa: E402
from moemesh.model.moe import RowOrder, combine, gather_tokens, permute  # noqa: E402


def rms_eager(x, w):
    """The model's RMSNorm (its PyTorch code) with weight w. In fp64 its fp32 upcast is skipped, so the
    reference is fp64 throughout."""
    if x.dtype == torch.float64:
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-5) * w
    return torch.func.functional_call(RMSNorm(x.shape[-1], 1e-5).to(x.device), {"weight": w}, (x,))


def cases(device):
    """(name, kernel fn, eager fn, inputs): the shapes of the fine-grained and Mixtral-shaped configs."""
    gen = torch.Generator(device=device).manual_seed(0)

    def randn(*shape, dtype=torch.bfloat16, scale=1.0):
        return (torch.randn(*shape, generator=gen, device=device) * scale).to(dtype)

    out = []
    for label, rows, ffn in (("fine-grained", 16384 * 6, 1408), ("mixtral", 16384 * 2, 14336)):
        out.append((f"swiglu/{label}", swiglu.swiglu, lambda g, u: F.silu(g) * u, [randn(rows, ffn), randn(rows, ffn)]))
    for dim in (2048, 4096):
        out.append((f"rmsnorm/d{dim}", lambda x, w: rmsnorm.rms_norm(x, w, 1e-5), rms_eager,
                    [randn(4, 4096, dim), 1 + randn(dim, scale=0.1)]))
    cos, sin = (t.to(device) for t in rotary_tables(128, 4096, 10000.0))
    out.append(("rotary/q-16x128", lambda x: rotary.rotary(x, cos, sin),
                lambda x: apply_rotary(x.transpose(1, 2), cos, sin).transpose(1, 2), [randn(4, 4096, 16, 128)]))
    for label, dim, experts, top_k in (("fine-grained", 2048, 64, 6), ("mixtral", 4096, 8, 2)):
        tokens = 16384
        experts_TK = torch.rand(tokens, experts, generator=gen, device=device).topk(top_k, dim=-1).indices
        rows = RowOrder.of(permute(experts_TK, experts, None).order_R, tokens, top_k)
        weights = torch.rand(tokens, top_k, generator=gen, device=device)
        out.append((f"combine/{label}", lambda y, w, rows=rows: gather_sum.combine(y, w, rows.order_R, rows.inverse_A),
                    lambda y, w, rows=rows: combine(y, rows, w), [randn(tokens * top_k, dim), weights]))
        out.append((f"gather/{label}", lambda x, rows=rows: gather_tokens(x, rows, fused=True),
                    lambda x, rows=rows: gather_tokens(x, rows), [randn(tokens, dim)]))
    return out


def run(fn, inputs, grad):
    leaves = [t.detach().clone().requires_grad_(True) for t in inputs]
    out = fn(*leaves)
    out.backward(grad)
    return [out.detach()] + [t.grad for t in leaves]


def rel(a, b):
    a, b = a.double(), b.double()
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


def time_ms(fn, inputs, grad, warmup=5, iters=20):
    leaves = [t.detach().clone().requires_grad_(True) for t in inputs]
    times = []
    for i in range(warmup + iters):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn(*leaves).backward(grad)
        end.record()
        torch.cuda.synchronize()
        if i >= warmup:
            times.append(start.elapsed_time(end))
        for t in leaves:
            t.grad = None
    return statistics.median(times)


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    device = "cuda"
    report = {"command": " ".join(["python3"] + sys.argv), "torch": torch.__version__,
              "gpu": torch.cuda.get_device_name(), "date": datetime.datetime.now(datetime.timezone.utc).isoformat(),
              "cases": {}}
    for name, kernel, eager, inputs in cases(device):
        probe = eager(*inputs)
        grad = torch.randn(probe.shape, device=device).to(probe.dtype)
        got, ref = run(kernel, inputs, grad), run(eager, inputs, grad)
        exact = run(eager, [t.double() if t.is_floating_point() else t for t in inputs], grad.double())
        row = {"rel_err_kernel_vs_eager": [rel(a, b) for a, b in zip(got, ref)],
               "rel_err_kernel_vs_fp64": [rel(a, b) for a, b in zip(got, exact)],
               "rel_err_eager_vs_fp64": [rel(a, b) for a, b in zip(ref, exact)],
               "kernel_ms": time_ms(kernel, inputs, grad), "eager_ms": time_ms(eager, inputs, grad)}
        row["speedup"] = row["eager_ms"] / row["kernel_ms"]
        report["cases"][name] = row
        print(name, json.dumps({k: (round(v, 4) if isinstance(v, float) else [f"{x:.2e}" for x in v])
                                for k, v in row.items()}), flush=True)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "kernels_check.json").write_text(json.dumps(report, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
