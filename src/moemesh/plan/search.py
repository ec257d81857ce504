"""`moemesh plan CONFIG --gpus N`: every valid (dp, ep, tp) with sequence parallelism and activation
checkpointing, its per-GPU memory (plan/memory.py on the real placement table) and step time
(plan/cost.py), ranked by time among those that fit.

Micro-batches are not a choice: the training loop has no gradient accumulation, so each data x expert
coordinate runs global_batch / (dp * ep) sequences at once, which the layout fixes.
"""

from __future__ import annotations

import dataclasses
import json
import time
from dataclasses import dataclass
from pathlib import Path

from moemesh.config import Config, _validate_layout, load_config
from moemesh.errors import ConfigError, UserError
from moemesh.plan.cost import GPU, GPUS, H200_CONSTANTS, Constants, fit, shape_of, step_time
from moemesh.plan.memory import GIB, estimate_layout, meta_model
from moemesh.train import cuda_graph

HEADROOM = 0.95  # fraction of GPU memory a plan may use: allocator fragmentation, NCCL buffers
IMBALANCE = 1.3  # max/mean rows per expert rank under natural routing (measured 1.28 per expert, Mixtral shape)


@dataclass
class Candidate:
    dp: int
    ep: int
    tp: int
    sequence_parallel: bool
    recompute: str
    memory: int  # bytes per GPU at the training peak, as torch.cuda.max_memory_allocated counts them
    build: int  # bytes per GPU while the full model is built before sharding (design.md §11), context included
    overhead: int  # CUDA context and allocator slack, beside `memory`
    terms: dict[str, float]
    fits: bool
    graphed: bool = False  # its step is replayed as one CUDA graph (train/cuda_graph.py)

    @property
    def step_s(self) -> float:
        return sum(self.terms.values())

    @property
    def need(self) -> int:
        """What the GPU must hold: the training peak plus the context, or the build, whichever is larger."""
        return max(self.memory + self.overhead, self.build)

    @property
    def bottleneck(self) -> str:
        return max(self.terms, key=self.terms.get)


def factorisations(n: int):
    for dp in range(1, n + 1):
        if n % dp:
            continue
        rest = n // dp
        for ep in range(1, rest + 1):
            if rest % ep == 0:
                yield dp, ep, rest // ep


def valid(cfg: Config, dp: int, ep: int, tp: int, sp: bool) -> bool:
    """config._validate_layout's rules, the one definition of a valid layout."""
    trial = dataclasses.replace(cfg, parallel=dataclasses.replace(cfg.parallel, dp=dp, ep=ep, tp=tp,
                                                                  sequence_parallel=sp))
    try:
        _validate_layout(trial)
    except ConfigError:
        return False
    return True


def enumerate_plans(cfg: Config, gpus: int, gpus_per_node: int, gpu: GPU, constants: Constants,
                    imbalance: float = IMBALANCE, sharded_init: bool = False) -> list[Candidate]:
    """Every valid layout x checkpointing mode, priced. The meta model and its placement table are built
    once (plan/memory.py:CountsByLayout); each layout then costs arithmetic only."""
    from moemesh.plan.memory import CountsByLayout

    model = meta_model(cfg.model)
    by_sp: dict[bool, CountsByLayout] = {}
    modes = {mode: dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, activation_checkpointing=mode))
             for mode in ("none", "moe", "full")}
    out = []
    for dp, ep, tp in factorisations(gpus):
        graphed = cuda_graph.planned(cfg, (dp, ep, tp), gpu.capability)  # one CUDA graph per step
        for sp in ((False, True) if tp > 1 else (False,)):
            if not valid(cfg, dp, ep, tp, sp):
                continue
            if sp not in by_sp:
                by_sp[sp] = CountsByLayout(model, sp)
            counts, layout = by_sp[sp](ep, tp), by_sp[sp].layout(dp, ep, tp)
            shape = shape_of(cfg, layout, counts)
            for mode, c in modes.items():
                mem = estimate_layout(c, "cuda", layout, imbalance, counts)
                t = step_time(shape, dp, ep, tp, mode, gpu, gpus_per_node, imbalance, constants, graphed)
                build = 0 if sharded_init else mem.full_model + mem.overhead
                need = max(mem.device, build)
                out.append(Candidate(dp, ep, tp, sp, mode, mem.allocated, build, mem.overhead, t.terms,
                                     need <= HEADROOM * gpu.memory_gib * GIB, graphed))
    return out


def rank(cands: list[Candidate]) -> list[Candidate]:
    return sorted((c for c in cands if c.fits), key=lambda c: (c.step_s, c.memory))


def term_words(c: Candidate, term: str) -> str:
    """How `explain` names a term where its key alone says too little: the GPUs' idle time is the host's
    launching when the step runs op by op, the gaps between a replayed CUDA graph's kernels otherwise."""
    if term != "idle":
        return term
    return "idle between the CUDA graph's kernels" if c.graphed else "host-bound idle"


def explain(best: Candidate, ranked: list[Candidate], calibrated: bool = False) -> str:
    """Why `best` wins. `calibrated`: the constants were fitted to the user's files (--calibrate), so the
    advice to calibrate is left out."""
    why = [f"(dp={best.dp}, ep={best.ep}, tp={best.tp}{', SP' if best.sequence_parallel else ''}, "
           f"recompute={best.recompute}) is fastest at {best.step_s * 1e3:.1f} ms a step; its largest term is "
           f"{term_words(best, best.bottleneck)} ({best.terms[best.bottleneck] / best.step_s:.0%})."]
    others = [c for c in ranked[1:] if (c.dp, c.ep, c.tp) != (best.dp, best.ep, best.tp)]
    if others:
        o = others[0]
        diff = {k: o.terms[k] - best.terms[k] for k in best.terms}
        worst = max(diff, key=diff.get)
        why.append(f"The best other layout (dp={o.dp}, ep={o.ep}, tp={o.tp}) takes {o.step_s * 1e3:.1f} ms, mostly "
                   f"because of {term_words(o, worst)} (+{diff[worst] * 1e3:.1f} ms).")
    if best.recompute != "none":
        why.append("Activation checkpointing is needed to fit in memory at this layout.")
    gpus = best.dp * best.ep * best.tp
    if best.bottleneck == "idle" and gpus > 1 and not best.graphed:
        calibrate = "" if calibrated else " calibrate on yours (bench/mesh_sweep.sh, docs/planner.md);"
        why.append(f"A host-bound step's time varies between machines:{calibrate} without expert parallelism, "
                   f"train.cuda_graph=on replays the step as one CUDA graph instead.")
    if best.graphed and gpus > 2:
        why.append(f"Its step as one CUDA graph on a mesh is validated on 2 GPUs only, not yet on {gpus} "
                   f"(docs/planner.md).")
    return " ".join(why)


def plan_command(config: str | None, overrides, gpus: int, gpus_per_node: int, gpu_name: str, calibrate: list[str],
                 as_json: bool, top: int, imbalance: float, sharded_init: bool) -> int:
    started = time.perf_counter()
    if gpu_name not in GPUS:
        raise UserError(f"plan: --gpu {gpu_name!r} is not a known GPU (known: {', '.join(GPUS)})")
    if gpus < 1 or gpus_per_node < 1:
        raise UserError(f"plan: --gpus={gpus} and --gpus-per-node={gpus_per_node} must be >= 1")
    if not imbalance >= 1:
        raise UserError(f"plan: --imbalance={imbalance} must be >= 1 (max/mean expert-rank load)")
    cfg = load_config(config, list(overrides))
    gpu = GPUS[gpu_name]
    constants = fit([Path(p) for p in calibrate]) if calibrate else H200_CONSTANTS
    cands = enumerate_plans(cfg, gpus, gpus_per_node, gpu, constants, imbalance, sharded_init)
    if not cands:
        raise UserError(f"plan: no (dp, ep, tp) with dp*ep*tp={gpus} satisfies the config's divisibility rules "
                        f"(model.num_experts={cfg.model.num_experts}, model.n_kv_heads={cfg.model.n_kv_heads}, "
                        f"train.global_batch={cfg.train.global_batch}, ...)")
    ranked = rank(cands)
    if not ranked:
        smallest = min(cands, key=lambda c: c.need)
        need = smallest.need
        raise UserError(f"plan: no layout fits {gpus} x {gpu.name} ({gpu.memory_gib:.0f} GiB, {HEADROOM:.0%} usable): "
                        f"needs >= {need / HEADROOM / GIB:.1f} GiB per GPU; the smallest layout "
                        f"(dp={smallest.dp}, ep={smallest.ep}, tp={smallest.tp}, recompute={smallest.recompute}) "
                        f"needs {need / GIB:.1f} GiB" + ("" if sharded_init or smallest.build <= smallest.memory + smallest.overhead else
                                                         " (the full model built on each GPU first; see --sharded-init)"))
    elapsed = time.perf_counter() - started
    tokens = cfg.train.global_batch * cfg.train.seq_len
    if as_json:
        print(json.dumps({"gpus": gpus, "gpus_per_node": gpus_per_node, "gpu": dataclasses.asdict(gpu),
                          "constants": dataclasses.asdict(constants), "imbalance": imbalance,
                          "evaluated": len(cands), "feasible": len(ranked), "plan_s": elapsed,
                          "explanation": explain(ranked[0], ranked, bool(calibrate)),
                          "plans": [{"dp": c.dp, "ep": c.ep, "tp": c.tp, "sequence_parallel": c.sequence_parallel,
                                     "activation_checkpointing": c.recompute, "cuda_graph": c.graphed, "step_s": c.step_s,
                                     "tokens_per_s": tokens / c.step_s, "memory_gib": c.memory / GIB,
                                     "device_gib": c.need / GIB, "build_gib": c.build / GIB, "bottleneck": c.bottleneck, "terms_s": c.terms}
                                    for c in ranked[:top]]}, indent=1))
        return 0
    print(f"moemesh plan: {gpus} x {gpu.name} ({gpus_per_node} per node), {len(cands)} candidates, "
          f"{len(ranked)} fit; {elapsed:.2f} s")
    head = f"{'#':>3} {'dp':>5} {'ep':>4} {'tp':>3} {'SP':>3} {'recompute':>9} {'step ms':>9} {'Mtok/s':>8} {'GiB/GPU':>8}  bottleneck"
    print(head)
    for i, c in enumerate(ranked[:top], 1):
        print(f"{i:>3} {c.dp:>5} {c.ep:>4} {c.tp:>3} {'y' if c.sequence_parallel else '-':>3} {c.recompute:>9} "
              f"{c.step_s * 1e3:>9.1f} {tokens / c.step_s / 1e6:>8.3f} {c.need / GIB:>8.1f}  {c.bottleneck}")
    print(explain(ranked[0], ranked, bool(calibrate)))
    return 0
