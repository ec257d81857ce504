"""The planner against bench/mesh_runs.py's measurements, offline on CPU: every run's predicted step time
and allocated peak beside the measured ones (the candidate `moemesh plan` prices for the run's layout,
sequence parallelism and checkpointing, shipped constants), and per config and GPU count whether the
planner orders the layouts as measured (pairwise, and the fastest).

A pair of layouts counts as measured apart only when their step times differ beyond the steps' own
variation: a two-sided Mann-Whitney U test of the two runs' timed steps at 5 % (`apart`). Other pairs are
ties within noise: either order agrees with the measurement.

    python bench/mesh_report.py bench/results/mesh_heldout_x2.json [MORE.json ...] [--out report.json]
        [--fit FILE ...]   (the constants `moemesh plan --calibrate FILE ...` fits, instead of the shipped ones)
"""

from __future__ import annotations

import argparse
import functools
import itertools
import statistics
import sys
from pathlib import Path

from plan_report import run_report  # bench/plan_report.py (bench/ is on sys.path when run as a script)


def predict(run, constants) -> dict:
    from moemesh.config import load_config
    from moemesh.plan.cost import GPUS
    from moemesh.plan.memory import GIB
    from moemesh.plan.search import IMBALANCE, enumerate_plans

    dp, ep, tp = run.layout
    # as it ran: replayed as one CUDA graph or launched op by op (every multi-GPU run before session 6), where
    # the run says (a single-GPU run of an older file: as the planner assumes)
    launch = {True: ["train.cuda_graph=on"], False: ["train.cuda_graph=off"], None: []}[run.graphed]
    cfg = load_config("gpu", [*run.overrides, *launch])
    (c,) = [c for c in enumerate_plans(cfg, dp * ep * tp, 8, GPUS["h200"], constants, IMBALANCE)
            if (c.dp, c.ep, c.tp, c.sequence_parallel, c.recompute) == (dp, ep, tp, run.sequence_parallel, run.recompute)]
    return {"step_ms": c.step_s * 1e3, "memory_gib": c.memory / GIB}


def apart(a: list[float], b: list[float], alpha: float = 0.05) -> bool:
    """Whether two runs' timed steps differ beyond their variation: the two-sided Mann-Whitney U test rejects
    equal distributions at `alpha`. Exact for untied steps; ties count a half against the untied null
    distribution, which makes the test conservative there. Runs without per-step times count as apart."""
    if not a or not b:
        return True
    u = sum((x < y) + 0.5 * (x == y) for x in a for y in b)
    extreme = min(u, len(a) * len(b) - u)
    counts = _u_counts(len(a), len(b))  # how many orderings give each U, for U = 0 .. m*n
    p = 2 * sum(counts[k] for k in range(len(counts)) if k <= extreme) / sum(counts)
    return p <= alpha


@functools.lru_cache(maxsize=None)
def _u_counts(m: int, n: int) -> tuple[int, ...]:
    """The number of orderings of m and n distinct values with U = 0, 1, ..., m*n, U the pairs where the
    first sample's value is the larger (f(m, n, u) = f(m-1, n, u-n) + f(m, n-1, u): the largest value is one
    of the m, above all n, or one of the n). Symmetric in u and m*n - u, so it serves `apart`'s U too."""
    if m == 0 or n == 0:
        return (1,)
    out = [0] * (m * n + 1)
    for u, c in enumerate(_u_counts(m - 1, n)):
        out[u + n] += c
    for u, c in enumerate(_u_counts(m, n - 1)):
        out[u] += c
    return tuple(out)


def report(paths: list[Path], fit_files: list[Path] | None = None) -> dict:
    from moemesh.plan.cost import H200_CONSTANTS, fit, load_mesh_runs

    constants = fit(fit_files) if fit_files else H200_CONSTANTS
    rows = []
    for run in (r for p in paths for r in load_mesh_runs(p)):
        p = predict(run, constants)
        rows.append({"label": run.label, "config": run.label.split("/")[0], "layout": list(run.layout),
                     "gpus": run.layout[0] * run.layout[1] * run.layout[2],
                     "measured_step_ms": run.step_s * 1e3, "predicted_step_ms": p["step_ms"],
                     "err_step": p["step_ms"] / (run.step_s * 1e3) - 1, "measured_memory_gib": run.memory_gib,
                     "predicted_memory_gib": p["memory_gib"],
                     "err_memory": p["memory_gib"] / run.memory_gib - 1 if run.memory_gib else None,
                     "steps_ms": [t * 1e3 for t in run.steps_s], "cuda_graph": run.graphed})
    multi = [r for r in rows if r["gpus"] > 1]
    ranking = {}
    for config, gpus in sorted({(r["config"], r["gpus"]) for r in multi}):
        mine = [r for r in multi if (r["config"], r["gpus"]) == (config, gpus)]
        pairs = list(itertools.combinations(mine, 2))
        agree = [(a["measured_step_ms"] - b["measured_step_ms"]) * (a["predicted_step_ms"] - b["predicted_step_ms"]) > 0
                 for a, b in pairs]
        resolved = [apart(a["steps_ms"], b["steps_ms"]) for a, b in pairs]
        ranking[f"{config} on {gpus} GPUs"] = {
            "pairs": len(pairs), "agreeing": sum(agree), "apart": sum(resolved),
            "apart_agreeing": sum(a and r for a, r in zip(agree, resolved)),
            "wrong": [f"{a['label']} vs {b['label']}" for (a, b), ok, r in zip(pairs, agree, resolved) if r and not ok],
            "fastest_measured": min(mine, key=lambda r: r["measured_step_ms"])["label"],
            "fastest_predicted": min(mine, key=lambda r: r["predicted_step_ms"])["label"]}
    errors = [abs(r["err_step"]) for r in multi]
    summary = {"runs": len(multi), "step_mae": statistics.fmean(errors) if errors else None,
               "step_worst": max((r["err_step"] for r in multi), key=abs, default=None),
               "memory_worst": max((r["err_memory"] for r in multi if r["err_memory"] is not None), key=abs, default=None),
               "pairs": sum(v["pairs"] for v in ranking.values()), "pairs_agreeing": sum(v["agreeing"] for v in ranking.values()),
               "pairs_apart": sum(v["apart"] for v in ranking.values()),
               "pairs_apart_agreeing": sum(v["apart_agreeing"] for v in ranking.values()),
               "fastest_right": sum(v["fastest_measured"] == v["fastest_predicted"] for v in ranking.values()),
               "configs": len(ranking)}
    by_launch = {}  # a step replayed as one CUDA graph is the device's; one launched op by op, host-bound
    for name, graphed in (("cuda_graph", True), ("op_by_op", False)):
        errs = [r["err_step"] for r in multi if bool(r["cuda_graph"]) == graphed]
        if errs:
            by_launch[name] = {"runs": len(errs), "step_mae": statistics.fmean(abs(e) for e in errs),
                               "step_worst": max(errs, key=abs)}
    return {"files": [str(p) for p in paths], "constants_source": constants.source, "rows": rows,
            "ranking": ranking, "summary_multi_gpu": summary, "summary_by_launch": by_launch}


def format_report(rep: dict) -> str:
    lines = ["| run | measured ms | predicted ms | error | measured GiB | predicted GiB | error |",
             "|---|---|---|---|---|---|---|"]
    for r in rep["rows"]:
        em = f"{r['err_memory']:+.1%}" if r["err_memory"] is not None else "-"
        lines.append(f"| {r['label']} | {r['measured_step_ms']:.1f} | {r['predicted_step_ms']:.1f} | {r['err_step']:+.1%} | "
                     f"{r['measured_memory_gib']:.1f} | {r['predicted_memory_gib']:.1f} | {em} |")
    s = rep["summary_multi_gpu"]
    if s["runs"]:
        lines += ["", f"multi-GPU runs: {s['runs']}; step time MAE {s['step_mae']:.1%}, worst {s['step_worst']:+.1%}; "
                      f"memory worst {s['memory_worst']:+.1%}; layout pairs ordered as measured: {s['pairs_agreeing']} of "
                      f"{s['pairs']}; of the {s['pairs_apart']} pairs measured apart: {s['pairs_apart_agreeing']}; "
                      f"fastest layout right for {s['fastest_right']} of {s['configs']} configs"]
        lines += [f"- steps {'replayed as one CUDA graph' if name == 'cuda_graph' else 'launched op by op'}: "
                  f"{v['runs']} runs, MAE {v['step_mae']:.1%}, worst {v['step_worst']:+.1%}"
                  for name, v in rep["summary_by_launch"].items()]
    for config, v in rep["ranking"].items():
        wrong = f" (wrong: {'; '.join(v['wrong'])})" if v["wrong"] else ""
        lines.append(f"- {config}: {v['agreeing']}/{v['pairs']} pairs, {v['apart_agreeing']}/{v['apart']} of those "
                     f"measured apart{wrong}; fastest measured {v['fastest_measured']}, predicted {v['fastest_predicted']}")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("files", nargs="+", type=Path)
    parser.add_argument("--out", type=Path)
    parser.add_argument("--fit", nargs="+", type=Path, help="fit the constants to these files first")
    args = parser.parse_args(argv)
    return run_report("mesh_report", lambda: report(args.files, args.fit), format_report, args.out)


if __name__ == "__main__":
    sys.exit(main())
