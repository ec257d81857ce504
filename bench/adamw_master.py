"""The optimizer step over fp32 masters on one GPU: the one-pass Triton kernel (`train/fused_adamw.py`)
against the path it replaces (bf16 grads cast to fp32 master grads, torch's fused AdamW, masters copied
back into the bf16 parameters) and against the device's copy bandwidth, at the Mixtral-shaped config's
parameter shapes. Also checks the kernel against its PyTorch fallback on the GPU.

    PYTHONPATH=src python3 bench/adamw_master.py --out $OUT     # writes $OUT/adamw_master.json
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

from moemesh.config import load_config
from moemesh.model.transformer import Transformer
from moemesh.train import fused_adamw
from moemesh.train.master import MasterWeights
from moemesh.train.optim import build_optimizer

MIXTRAL = ["model.n_layers=2", "model.dim=4096", "model.ffn_dim=14336", "model.num_experts=8", "model.top_k=2",
           "model.n_heads=32", "model.n_kv_heads=8", "model.vocab_size=32000"]


def _median_ms(fn, iters: int = 10) -> float:
    for _ in range(3):
        fn()
    times = []
    for _ in range(iters):
        start, stop = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        stop.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(stop))
    return sorted(times)[len(times) // 2]


def _setup(cfg):
    torch.manual_seed(0)
    with torch.device("cuda"):
        model = Transformer(cfg.model)
    masters = MasterWeights(model, torch.bfloat16)
    optimizer = build_optimizer(masters, cfg.train, fused=True)
    for p in model.parameters():
        p.grad = torch.randn_like(p) * 1e-3
    return model, masters, optimizer


def check_against_fallback(cfg) -> dict:
    results = {}
    runs = []
    for impl in (fused_adamw.step, fused_adamw.step_reference):
        model, masters, optimizer = _setup(cfg)
        found_inf, scale = torch.zeros((), device="cuda"), torch.tensor(1.3, device="cuda")
        lr = torch.tensor(cfg.train.lr, device="cuda")
        for _ in range(3):
            impl(optimizer, masters.model_params, masters.grads(False), found_inf, scale, lr)
        runs.append((list(masters.parameters()), list(model.parameters())))
    (mk, pk), (mr, pr) = runs
    results["master_max_rel_diff"] = max(float((a - b).norm() / b.norm()) for a, b in zip(mk, mr))
    results["bf16_params_differing_elements"] = sum(int((a != b).sum()) for a, b in zip(pk, pr))
    results["bf16_params_elements"] = sum(p.numel() for p in pk)
    return results


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    cfg = load_config("gpu", MIXTRAL)
    report = {"command": " ".join(sys.argv), "gpu": torch.cuda.get_device_name(), "torch": torch.__version__,
              "config": MIXTRAL, "check": check_against_fallback(load_config("gpu", MIXTRAL[:1] + ["model.dim=512",
                                                                            "model.ffn_dim=1024"]))}
    model, masters, optimizer = _setup(cfg)
    n = sum(p.numel() for p in model.parameters())
    found_inf, scale = torch.zeros((), device="cuda"), torch.tensor(1.3, device="cuda")
    lr = torch.tensor(cfg.train.lr, device="cuda")
    grads = {m: p.grad for m, p in masters.model_params.items()}

    def fused():
        fused_adamw.step(optimizer, masters.model_params, grads, found_inf, scale, lr)

    def unfused():  # what the loop did before: cast, torch's fused AdamW, copy back
        for m, p in masters.model_params.items():
            m.grad = grads[m].float()
        optimizer.found_inf, optimizer.grad_scale = found_inf, scale
        optimizer.step()
        masters.masters_to_model()

    big = torch.empty(n, dtype=torch.float32, device="cuda")
    other = torch.empty_like(big)
    copy_ms = _median_ms(lambda: other.copy_(big))
    copy_gbs = 8 * n / copy_ms / 1e6
    fused_ms, unfused_ms = _median_ms(fused), _median_ms(unfused)
    report.update({"parameters": n, "copy_ms": copy_ms, "copy_GBps": copy_gbs,
                   "fused_ms": fused_ms, "fused_bytes_per_param": 28,
                   "fused_GBps": 28 * n / fused_ms / 1e6, "unfused_ms": unfused_ms,
                   "unfused_bytes_per_param": 40, "unfused_GBps": 40 * n / unfused_ms / 1e6,
                   "speedup": unfused_ms / fused_ms})
    report["fused_of_copy_bandwidth"] = report["fused_GBps"] / copy_gbs
    Path(args.out).mkdir(parents=True, exist_ok=True)
    (Path(args.out) / "adamw_master.json").write_text(json.dumps(report, indent=1))
    print(json.dumps(report, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
