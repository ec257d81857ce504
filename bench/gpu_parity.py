"""Two-GPU parity (issue 3): layouts (1,2,1), (1,1,2), (2,1,1) on NCCL against the 1-GPU run, fp32 and
bf16, then tokens/s of the `gpu` preset at each 2-GPU layout and on 1 GPU. One script, one device call:

    NCCL_NVLS_ENABLE=0 PYTHONPATH=src torchrun --nproc-per-node 2 bench/gpu_parity.py --out $OUT

Writes parity.json (per case: per-step loss and grad-norm errors, worst parameter error) to --out.
"""

from __future__ import annotations

import argparse
import os
import sys

from moemesh.parity import Case, run_cases

LAYOUTS = [(1, 2, 1), (1, 1, 2), (2, 1, 1)]
MEDIUM = ["model.dim=512", "model.n_heads=8", "model.n_kv_heads=4", "model.num_experts=8", "model.ffn_dim=1024",
          "model.vocab_size=4096", "model.max_seq_len=256", "train.seq_len=256", "train.global_batch=16"]


def cases(diagnose: bool) -> list[Case]:
    if diagnose:  # fp32 run-to-run noise floor of the 1-GPU reference, next to each layout
        return [Case(f"float32-medium-{'x'.join(map(str, layout))}", layout,
                     ["train.device=cuda", "train.dtype=float32", *MEDIUM], repeat_reference=True)
                for layout in LAYOUTS]
    out = []
    for dtype in ("float32", "bfloat16"):
        for size, extra in (("tiny", []), ("medium", MEDIUM)):
            for layout in LAYOUTS:
                name = f"{dtype}-{size}-{'x'.join(map(str, layout))}"
                out.append(Case(name, layout, ["train.device=cuda", f"train.dtype={dtype}", *extra]))
        out.append(Case(f"{dtype}-tiny-sp-capacity-1x1x2", (1, 1, 2),
                        ["train.device=cuda", f"train.dtype={dtype}", "parallel.sequence_parallel=true",
                         "model.dispatch=capacity", "model.router=sigmoid", "model.num_shared_experts=1"]))
    return out


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True)
    parser.add_argument("--diagnose", action="store_true", help="fp32 noise-floor cases only")
    parser.add_argument("--deterministic", action="store_true", help="torch.use_deterministic_algorithms")
    args = parser.parse_args()
    os.makedirs(args.out, exist_ok=True)
    if args.deterministic:
        import torch

        torch.use_deterministic_algorithms(True)
    name = "parity" + ("-diagnose" if args.diagnose else "") + ("-deterministic" if args.deterministic else "")
    sys.exit(run_cases(cases(args.diagnose), os.path.join(args.out, f"{name}.json"), "cuda"))
