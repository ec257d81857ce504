"""Issue 10 on two GPUs, the overlap parts, in one device call (kind nvidia-h200-x2):

  (a) the ep=2 all-to-all as moemesh issues it (`AxisComm` through the autograd wrapper, and as two
      asynchronous chunks) against NCCL's `all_to_all_single` at the same bytes: bus bandwidth, ratio;
  (b) the MoE layer at ep=2, per-GPU time (forward + backward, max over the two ranks) with
      `ep_overlap_chunks` 1 and 2, against all experts on one GPU at the same tokens per rank:
      expert-parallel efficiency = one-GPU time / ep=2 time, and the ep=2 output's error against the
      one-GPU layer on the same tokens;
  (c) end-to-end tokens/s, TFLOP/s per GPU, MFU and peak memory of the Mixtral-shaped and fine-grained
      configs (bench/train_e2e.py) on 1 GPU and at (2,1,1), (1,2,1), (1,1,2), each with the overlaps off,
      the gradient overlap on, and (at ep=2) the expert all-to-all in 2 chunks too.
(d) bf16/fp32 parity of the 2-GPU layouts is bench/gpu_parity.py, whose harness now runs with the
overlaps on (moemesh.parity.OVERLAP). torchtitan's MoE layer on one GPU is bench/moe_layer.py; its
expert-parallel layer is not run here.

    NCCL_NVLS_ENABLE=0 PYTHONPATH=src torchrun --nproc-per-node 2 bench/overlap.py --out $OUT
    PYTHONPATH=src python bench/overlap.py --cpu-dry-run --out /tmp/x     # 2 gloo ranks, tiny sizes: plumbing

Writes overlap.json under --out (rank 0), and prints a table per part.
"""

from __future__ import annotations

import argparse
import copy
import datetime
import json
import os
import statistics
import sys
import time
import traceback
from pathlib import Path

import torch
import torch.distributed as dist

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "src"))
sys.path.insert(0, str(REPO / "bench"))

from moemesh.config import load_config  # noqa: E402
from moemesh.launch import finish, launch_local  # noqa: E402
from moemesh.model.moe import MoE  # noqa: E402
from moemesh.parallel.comm import all_reduce_with_grad, all_to_all  # noqa: E402
from moemesh.parallel.expert import ExpertParallelDispatcher  # noqa: E402
from moemesh.parallel.mesh import Mesh  # noqa: E402
from moemesh.plan.flops import flops_per_token  # noqa: E402
from moemesh.train.data import build_source  # noqa: E402
from moemesh.train.loop import Trainer  # noqa: E402
from train_e2e import CONFIGS, PEAK_TFLOPS  # noqa: E402

LAYER_SHAPES = {  # bench/moe_layer.py's shapes
    "mixtral": dict(dim=4096, ffn_dim=14336, num_experts=8, top_k=2),
    "fine_grained": dict(dim=2048, ffn_dim=1408, num_experts=64, top_k=6),
}
DRY_LAYER_SHAPES = {"mixtral": dict(dim=64, ffn_dim=128, num_experts=8, top_k=2),
                    "fine_grained": dict(dim=32, ffn_dim=48, num_experts=16, top_k=4)}
DRY_E2E = {"tiny": ("tiny", ["train.global_batch=8", "train.seq_len=32"])}
LAYOUTS = [(2, 1, 1), (1, 2, 1), (1, 1, 2)]
OFF = ["parallel.overlap_grad_reduce=false", "parallel.ep_overlap_chunks=1"]
VARIANTS = {"off": OFF, "grad": ["parallel.overlap_grad_reduce=true", "parallel.ep_overlap_chunks=1"],
            "grad+ep2chunks": ["parallel.overlap_grad_reduce=true", "parallel.ep_overlap_chunks=2"]}


class Bench:
    def __init__(self, dry: bool, warmup: int, iters: int):
        self.dry, self.warmup, self.iters = dry, warmup, iters
        self.device = torch.device("cpu") if dry else torch.device("cuda", torch.cuda.current_device())
        self.dtype = torch.float32 if dry else torch.bfloat16
        self.rank = dist.get_rank()

    def sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize()

    def median_ms(self, fn, warmup: int | None = None, iters: int | None = None, aligned: bool = True) -> float:
        """Median wall time of fn() on this rank; with `aligned`, both ranks start each call together."""
        for _ in range(self.warmup if warmup is None else warmup):
            fn()
        times = []
        for _ in range(self.iters if iters is None else iters):
            self.sync()
            if aligned:
                dist.barrier()
            started = time.perf_counter()
            fn()
            self.sync()
            times.append(1000 * (time.perf_counter() - started))
        return statistics.median(times)

    def world_max(self, value: float) -> float:
        t = torch.tensor([value], dtype=torch.float64, device=self.device)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return float(t.item())


# --- (a) ---------------------------------------------------------------------------------------------

def bench_all_to_all(b: Bench, mesh: Mesh) -> list[dict]:
    comm = mesh.comm("expert")
    n, dim = comm.size, 64 if b.dry else 4096
    rows_list = []
    for mb in ([0.0625, 0.25] if b.dry else [16, 64, 256, 1024]):
        rows = int(mb * 2**20) // (dim * torch.tensor([], dtype=b.dtype).element_size()) // (2 * n) * (2 * n)
        x = torch.randn(rows, dim, dtype=b.dtype, device=b.device)
        out = torch.empty_like(x)
        splits, halves = [rows // n] * n, [rows // (2 * n)] * n
        x_halves = [x[:rows // 2].contiguous(), x[rows // 2:].contiguous()]

        def two_chunks():
            flights = [comm.all_to_all_async(half, halves, halves) for half in x_halves]
            for _, pending in flights:
                pending.wait()

        methods = {
            "all_to_all_single": lambda: dist.all_to_all_single(out, x, splits, splits, group=comm.group),
            "moemesh": lambda: all_to_all(x, comm, splits, splits),
            "moemesh_2_async_chunks": two_chunks,
        }
        entry = {"mb_per_rank": mb, "rows": rows, "dim": dim}
        for name, fn in methods.items():
            ms = b.world_max(b.median_ms(fn))
            alg = rows * dim * x.element_size() / (ms / 1000)
            entry[name] = {"ms": round(ms, 4), "bus_gb_s": round(alg * (n - 1) / n / 1e9, 2)}
        for name in ("moemesh", "moemesh_2_async_chunks"):
            entry[name]["of_all_to_all_single"] = round(entry["all_to_all_single"]["ms"] / entry[name]["ms"], 3)
        rows_list.append(entry)
        if b.rank == 0:
            print(f"[a2a] {mb} MB: " + "  ".join(f"{k} {v['ms']:.3f} ms {v['bus_gb_s']} GB/s"
                                                  for k, v in entry.items() if isinstance(v, dict)), flush=True)
    return rows_list


# --- (b) ---------------------------------------------------------------------------------------------

def _layer_step(moe: MoE, x_TD: torch.Tensor, g_TD: torch.Tensor):
    params = list(moe.parameters())

    def step():
        for p in params:
            p.grad = None
        y, aux, z = moe(x_TD[None])
        torch.autograd.backward([y, 0.01 * aux + 0.001 * z], [g_TD[None], None])
        return y[0].detach()

    return step


def _expert_parallel(full: MoE, comm, chunks: int) -> MoE:
    moe = copy.deepcopy(full)
    rank, ep = comm.rank, comm.size
    with torch.no_grad():
        for name in ("w1_EDF", "w3_EDF", "w2_EFD"):
            weight = getattr(moe.experts, name)
            setattr(moe.experts, name, torch.nn.Parameter(weight.chunk(ep, dim=0)[rank].clone()))
    moe.dispatcher = ExpertParallelDispatcher(comm, None, chunks)
    moe.stats_reducer = lambda stats: all_reduce_with_grad(stats, comm)
    return moe


def bench_layer(b: Bench, mesh: Mesh) -> dict:
    comm = mesh.comm("expert")
    tokens = 256 if b.dry else 16384
    results = {}
    for shape_name, shape in (DRY_LAYER_SHAPES if b.dry else LAYER_SHAPES).items():
        torch.manual_seed(0)  # the same layer on both ranks; different tokens per rank
        full = MoE(**shape).to(b.device, b.dtype)
        gen = torch.Generator(device=b.device).manual_seed(100 + b.rank)
        shared = torch.randn(shape["dim"], device=b.device, generator=torch.Generator(device=b.device).manual_seed(7))
        x_TD = (torch.randn(tokens, shape["dim"], device=b.device, generator=gen) + 0.3 * shared).to(b.dtype)
        g_TD = torch.randn(tokens, shape["dim"], device=b.device, generator=gen).to(b.dtype)
        one_step = _layer_step(full, x_TD, g_TD)
        y_one = one_step()
        # One GPU: all experts on this rank's tokens, rank 0 alone (rank 1 waits).
        one_ms = b.median_ms(one_step, aligned=False) if b.rank == 0 else 0.0
        dist.barrier()
        entry = {"shape": shape, "tokens_per_rank": tokens, "one_gpu_ms": round(b.world_max(one_ms), 3)}
        for chunks in (1, 2):
            ep_step = _layer_step(_expert_parallel(full, comm, chunks), x_TD, g_TD)
            y_ep = ep_step()
            err = float((y_ep.float() - y_one.float()).norm() / y_one.float().norm())
            ms = b.world_max(b.median_ms(ep_step))
            entry[f"ep2_chunks{chunks}"] = {"ms": round(ms, 3), "efficiency": round(entry["one_gpu_ms"] / ms, 3),
                                            "output_rel_err_vs_one_gpu": b.world_max(err)}
        results[shape_name] = entry
        if b.rank == 0:
            print(f"[layer] {shape_name}: 1 GPU {entry['one_gpu_ms']} ms; " + "; ".join(
                f"{k} {v['ms']} ms eff {v['efficiency']} err {v['output_rel_err_vs_one_gpu']:.1e}"
                for k, v in entry.items() if k.startswith("ep2")), flush=True)
    return results


# --- (c) ---------------------------------------------------------------------------------------------

def _train_run(b: Bench, preset: str, overrides: list[str], layout: tuple[int, int, int] | None,
               steps: int, warmup: int) -> dict:
    dp, ep, tp = layout or (1, 1, 1)
    device_overrides = ["train.device=cpu", "train.dtype=float32"] if b.dry else ["train.device=cuda"]
    cfg = load_config(preset, [*overrides, *device_overrides, f"parallel.dp={dp}", f"parallel.ep={ep}",
                               f"parallel.tp={tp}", "run.progress=false", "run.tensorboard=false",
                               f"train.steps={steps}", "train.warmup_steps=1"])
    mesh = Mesh(dp, ep, tp, b.device.type, timeout_s=600) if layout is not None else None
    source = build_source(cfg.data, cfg.model.vocab_size, cfg.train.seq_len, cfg.train.seed)
    if b.device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    trainer = Trainer(cfg, mesh, source, b.device)
    times = []
    try:
        for step in range(1, steps + 1):
            b.sync()
            started = time.perf_counter()
            losses, *_ = trainer.step(step)
            losses = losses.tolist()  # the step's end, on the host
            times.append(time.perf_counter() - started)
    finally:
        trainer.close()
    step_s = statistics.median(times[warmup:])
    tokens_per_s = cfg.train.global_batch * cfg.train.seq_len / step_s
    tflops = flops_per_token(cfg).per_token * tokens_per_s / cfg.parallel.world_size / 1e12
    peak = torch.cuda.max_memory_allocated(b.device) / 2**30 if b.device.type == "cuda" else None
    return {"step_ms": round(1000 * step_s, 2), "tokens_per_s": round(tokens_per_s), "tflops_per_gpu": round(tflops, 1),
            "mfu": round(tflops / PEAK_TFLOPS, 4), "peak_gib": peak and round(peak, 2), "final_loss": losses[0]}


def bench_e2e(b: Bench) -> dict:
    steps, warmup = (4, 2) if b.dry else (12, 4)
    results = {}
    for config_name, (preset, overrides) in (DRY_E2E if b.dry else {k: CONFIGS[k] for k in
                                                                      ("mixtral-shaped", "fine-grained")}).items():
        runs = {}
        one = _train_run(b, preset, [*overrides, *OFF], None, steps, warmup) if b.rank == 0 else None
        dist.barrier()
        runs["1x1x1"] = one
        for layout in LAYOUTS:
            for variant, settings in VARIANTS.items():
                if variant == "grad+ep2chunks" and layout[1] == 1:
                    continue
                name = f"{'x'.join(map(str, layout))}/{variant}"
                result = _train_run(b, preset, [*overrides, *settings], layout, steps, warmup)
                result["vs_one_gpu_tokens_per_s"] = one and round(result["tokens_per_s"] / one["tokens_per_s"], 3)
                runs[name] = result
                if b.rank == 0:
                    print(f"[e2e] {config_name} {name}: {result}", flush=True)
        if b.rank == 0:
            print(f"[e2e] {config_name} 1x1x1: {one}", flush=True)
        results[config_name] = runs
    return results


# -----------------------------------------------------------------------------------------------------

def worker(out_dir: str, dry: bool, parts: list[str], warmup: int, iters: int) -> int:
    if not dry:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    dist.init_process_group("gloo" if dry else "nccl")
    assert dist.get_world_size() == 2, "two ranks: torchrun --nproc-per-node 2 (or --cpu-dry-run)"
    b = Bench(dry, warmup, iters)
    report: dict = {"command": " ".join(["python3"] + sys.argv), "dry_run": dry, "torch": torch.__version__,
                    "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                    "dtype": str(b.dtype), "errors": []}
    if not dry:
        report["gpu"] = torch.cuda.get_device_name()
    mesh = Mesh(1, 2, 1, b.device.type, timeout_s=600)
    parts_fn = {"a2a": lambda: bench_all_to_all(b, mesh), "layer": lambda: bench_layer(b, mesh),
                "e2e": lambda: bench_e2e(b)}
    for part in parts:
        try:
            report[part] = parts_fn[part]()
        except Exception:
            # The peer may be waiting in a collective: keep what was measured, then end this rank at once
            # (finish with a nonzero code does), and the launcher (or torchrun) stops the peer.
            report["errors"].append(f"{part}: {traceback.format_exc()[-3000:]}")
            print(report["errors"][-1], flush=True)
        if b.rank == 0:
            Path(out_dir, "overlap.json").write_text(json.dumps(report, indent=1) + "\n")
        if report["errors"]:
            break
    return finish(1 if report["errors"] else 0, exit_process=False)


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", default=os.environ.get("OUT", "/tmp/moemesh-overlap"))
    parser.add_argument("--cpu-dry-run", action="store_true", help="2 gloo ranks on the CPU, tiny sizes")
    parser.add_argument("--parts", default="a2a,layer,e2e")
    parser.add_argument("--warmup", type=int, default=None)
    parser.add_argument("--iters", type=int, default=None)
    args = parser.parse_args()
    os.makedirs(args.out, exist_ok=True)
    dry = args.cpu_dry_run
    worker_args = (args.out, dry, args.parts.split(","), args.warmup if args.warmup is not None else (1 if dry else 5),
                   args.iters if args.iters is not None else (3 if dry else 20))
    if "RANK" in os.environ:  # under torchrun
        return worker(*worker_args)
    failed = launch_local(worker, worker_args, 2)
    if failed is not None:
        print(failed, file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
