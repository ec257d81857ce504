"""Layout parity harness: training at a (dp, ep, tp) layout against the single-process run.

Used by the parity tests (tests/distributed) and the GPU benchmarks (bench/): many layouts run inside
one launch of `world` ranks (launch cost dominates on 2 cores).

For each case every rank trains `steps` AdamW steps at the case's (dp, ep, tp); rank 0 also trains the
single-process reference on the same global batches (with capacity applied per micro-batch, as each
rank does) and compares per-step losses and the gathered full parameters. Results go to a JSON file.
"""

from __future__ import annotations

import gc
import hashlib
import json
import os
import traceback
import weakref
from dataclasses import dataclass, field

import torch
import torch.distributed as dist

from moemesh.config import load_config
from moemesh.launch import finish
from moemesh.parallel.apply import gather_full_state
from moemesh.parallel.comm import CollectiveMismatch
from moemesh.parallel.mesh import Mesh
from moemesh.train.data import build_source
from moemesh.train.loop import Trainer


@dataclass
class Case:
    name: str
    layout: tuple[int, int, int]
    overrides: list[str] = field(default_factory=list)
    steps: int = 4
    force_expert: int | None = None  # route every token to this expert (imbalance case)
    skip_stats_on_rank: int | None = None  # planted collective-order bug (with check_collectives)
    repeat_reference: bool = False  # also run the reference twice: the run-to-run noise floor
    reference: bool = True  # False: no single-process run (a case only compared with its twin, bit for bit)


# Every overlap on (a case may turn one off or change it): gradient buckets small enough that the tiny
# model has ~10 of them, launched during backward; the expert all-to-all in two token chunks.
OVERLAP = ["parallel.overlap_grad_reduce=true", "parallel.bucket_mb=0.05", "parallel.ep_overlap_chunks=2"]


def _config(case: Case, layout: tuple[int, int, int]):
    dp, ep, tp = layout
    # warmup_steps=1: full learning rate from step 1, so parameters move well beyond rounding noise
    return load_config("tiny", ["train.warmup_steps=1", "train.lr=5e-4", *OVERLAP, *case.overrides,
                                f"train.steps={case.steps}", f"parallel.dp={dp}", f"parallel.ep={ep}",
                                f"parallel.tp={tp}", "run.progress=false"])


def _force_routing(trainer: Trainer, expert: int) -> None:
    with torch.no_grad():
        for moe in trainer.model.moe_layers():
            moe.router.gate.weight.zero_()
            moe.router.gate.weight.requires_grad_(False)
            moe.router.expert_bias[expert] = 1e3 if moe.router.kind == "sigmoid" else 0.0
            if moe.router.kind == "softmax":
                moe.router.gate.register_forward_hook(
                    lambda mod, args, out, e=expert: out + torch.nn.functional.one_hot(
                        torch.tensor(e), out.shape[-1]).to(out.dtype) * 1e3)


def _run(case: Case, mesh: Mesh | None, layout, device: torch.device) -> tuple[list[list[float]], dict, list]:
    cfg = _config(case, layout)
    source = build_source(cfg.data, cfg.model.vocab_size, cfg.train.seq_len, cfg.train.seed)
    trainer = Trainer(cfg, mesh, source, device)
    if mesh is None:  # reference: capacity per micro-batch of the layout being checked
        for moe in trainer.model.moe_layers():
            moe.capacity_groups = case.layout[0] * case.layout[1]
    if case.force_expert is not None:
        _force_routing(trainer, case.force_expert)
    if mesh is not None and case.skip_stats_on_rank == mesh.rank:
        trainer.model.moe_layers()[0].stats_reducer = lambda stats: stats
    losses, dropped = [], []
    initial = gather_full_state(trainer.model, trainer.layout, mesh)
    for step in range(1, case.steps + 1):
        step_losses, grad_norm, _, _ = trainer.step(step)
        losses.append([*step_losses.tolist(), float(grad_norm)])  # grad norm: Adam hides grad-scale bugs
        dropped.append([moe.expert_load()[1] for moe in trainer.model.moe_layers()])
    trainer.close()
    final = gather_full_state(trainer.model, trainer.layout, mesh)
    extra_roundtrip = _shard_roundtrip_ok(trainer, final, mesh)
    loads = [moe.expert_load()[0].tolist() for moe in trainer.model.moe_layers()]
    graphed = trainer.captured  # the steps after the warm-up were replays of one CUDA graph
    sync = trainer.grad_sync
    overlap = {"overlap": sync.overlap, "buckets": len(sync.buckets) if sync.overlap else 0,
               "launched_in_backward": sync.launched_in_backward,
               "all_to_all_in_flight": mesh.trace.max_in_flight if mesh is not None else None}
    model_ref = weakref.ref(trainer.model)  # a closed Trainer must not outlive its last reference (GPU memory)
    del trainer, sync
    gc.collect()
    overlap["freed"] = model_ref() is None
    return losses, final, {"dropped": dropped, "load": loads, "initial": initial, "roundtrip": extra_roundtrip,
                           "grad_overlap": overlap, "graphed": graphed}


def _shard_roundtrip_ok(trainer: Trainer, full: dict, mesh: Mesh | None) -> bool:
    """Sharding the gathered state onto the layout gives back every rank's own parameters, bit for bit."""
    local = trainer.layout.shard_state(full, mesh.coords) if mesh is not None else full
    ok = all(torch.equal(local[name], p.detach()) for name, p in trainer.model.named_parameters())
    if mesh is None:
        return ok
    flag = torch.tensor([0 if ok else 1], device=mesh.trace.device)  # NCCL reduces CUDA tensors only
    return bool(mesh.comm("world").all_reduce(flag).item() == 0)


def _digest(state: dict[str, torch.Tensor]) -> str:
    """Of every bit of a full state: equal digests mean bit-identical parameters."""
    sha = hashlib.sha256()
    for name in sorted(state):
        sha.update(name.encode())
        sha.update(state[name].detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
    return sha.hexdigest()


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


def compare_case(case: Case, rank: int, device: torch.device) -> dict:
    dp, ep, tp = case.layout
    cfg = _config(case, case.layout)
    mesh = Mesh(dp, ep, tp, device.type, check_collectives=cfg.parallel.check_collectives, timeout_s=60)
    result = {"name": case.name, "layout": list(case.layout)}
    try:
        losses, state, extra = _run(case, mesh, case.layout, device)
    except CollectiveMismatch as exc:
        return {**result, "mismatch": str(exc)}
    if rank != 0:
        return result
    result = {**result, "losses": losses, "state_sha": _digest(state), "grad_overlap": extra["grad_overlap"],
              "graphed": extra["graphed"]}
    if not case.reference:
        return result
    ref_losses, ref_state, ref_extra = _run(case, None, (1, 1, 1), device)
    loss_err = max(abs(a - b) / max(abs(b), 1e-30) for row, ref in zip(losses, ref_losses)
                   for a, b in zip(row, ref))
    param_errs = {name: _rel(state[name].float(), ref_state[name].float()) for name in ref_state}
    worst = max(param_errs, key=param_errs.get)
    # Error relative to how far training moved each tensor: a tolerance on ||p|| alone can hide a
    # layout that applies only part of the update when updates are small next to the weights.
    update_errs = {name: float((state[name].float() - ref_state[name].float()).norm()
                               / (ref_state[name].float() - ref_extra["initial"][name].float()).norm().clamp_min(1e-30))
                   for name in ref_state if not name.endswith("expert_bias")}
    worst_update = max(update_errs, key=update_errs.get)
    if case.repeat_reference:
        _, again, _ = _run(case, None, (1, 1, 1), device)
        result["reference_repeat_param_err"] = max(_rel(again[n].float(), ref_state[n].float()) for n in ref_state)
    return {**result, "ref_losses": ref_losses, "loss_rel_err": loss_err,
            "param_rel_err": param_errs[worst], "worst_param": worst, "param_errs": param_errs,
            "update_rel_err": update_errs[worst_update], "worst_update_param": worst_update,
            "names_match": sorted(state) == sorted(ref_state), "shard_roundtrip": extra["roundtrip"],
            "dropped": extra["dropped"], "ref_dropped": ref_extra["dropped"], "load": extra["load"],
            "ref_graphed": ref_extra["graphed"]}


def run_cases(cases: list[Case], out_path: str, device_type: str = "cpu") -> int:
    """One rank's part: gloo on CPU, NCCL with one GPU per rank on CUDA."""
    if device_type == "cuda":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        device = torch.device("cuda", torch.cuda.current_device())
    else:
        device = torch.device("cpu")
    dist.init_process_group("nccl" if device_type == "cuda" else "gloo")
    rank = dist.get_rank()
    results = []
    code = 0
    try:
        for case in cases:
            results.append(compare_case(case, rank, device))
            dist.barrier()
    except Exception:
        traceback.print_exc()
        code = 1
    if rank == 0:
        with open(out_path, "w") as f:
            json.dump(results, f)
    return finish(code, exit_process=False)
