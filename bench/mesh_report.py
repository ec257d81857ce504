"""The planner against bench/mesh_runs.py's measurements, offline on CPU: every run's predicted step time
and allocated peak beside the measured ones (the candidate `moemesh plan` prices for the run's layout,
sequence parallelism and checkpointing, shipped constants), and per config whether the planner orders the
multi-GPU layouts as measured (pairwise, and the fastest).

    python bench/mesh_report.py bench/results/mesh_validate_x2.json [MORE.json ...] [--out report.json]
"""

from __future__ import annotations

import argparse
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
    cfg = load_config("gpu", run.overrides)
    (c,) = [c for c in enumerate_plans(cfg, dp * ep * tp, 8, GPUS["h200"], constants, IMBALANCE)
            if (c.dp, c.ep, c.tp, c.sequence_parallel, c.recompute) == (dp, ep, tp, run.sequence_parallel, run.recompute)]
    return {"step_ms": c.step_s * 1e3, "memory_gib": c.memory / GIB}


def report(paths: list[Path]) -> dict:
    from moemesh.plan.cost import H200_CONSTANTS, load_mesh_runs

    rows = []
    for run in (r for p in paths for r in load_mesh_runs(p)):
        p = predict(run, H200_CONSTANTS)
        rows.append({"label": run.label, "config": run.label.split("/")[0], "layout": list(run.layout),
                     "gpus": run.layout[0] * run.layout[1] * run.layout[2],
                     "measured_step_ms": run.step_s * 1e3, "predicted_step_ms": p["step_ms"],
                     "err_step": p["step_ms"] / (run.step_s * 1e3) - 1, "measured_memory_gib": run.memory_gib,
                     "predicted_memory_gib": p["memory_gib"],
                     "err_memory": p["memory_gib"] / run.memory_gib - 1 if run.memory_gib else None})
    multi = [r for r in rows if r["gpus"] > 1]
    ranking = {}
    for config in sorted({r["config"] for r in multi}):
        mine = [r for r in multi if r["config"] == config]
        pairs = list(itertools.combinations(mine, 2))
        agree = [(a["measured_step_ms"] - b["measured_step_ms"]) * (a["predicted_step_ms"] - b["predicted_step_ms"]) > 0
                 for a, b in pairs]
        ranking[config] = {"pairs": len(pairs), "agreeing": sum(agree),
                           "fastest_measured": min(mine, key=lambda r: r["measured_step_ms"])["label"],
                           "fastest_predicted": min(mine, key=lambda r: r["predicted_step_ms"])["label"]}
    errors = [abs(r["err_step"]) for r in multi]
    summary = {"runs": len(multi), "step_mae": statistics.fmean(errors) if errors else None,
               "step_worst": max((r["err_step"] for r in multi), key=abs, default=None),
               "memory_worst": max((r["err_memory"] for r in multi if r["err_memory"] is not None), key=abs, default=None),
               "pairs": sum(v["pairs"] for v in ranking.values()), "pairs_agreeing": sum(v["agreeing"] for v in ranking.values()),
               "fastest_right": sum(v["fastest_measured"] == v["fastest_predicted"] for v in ranking.values()),
               "configs": len(ranking)}
    return {"files": [str(p) for p in paths], "constants_source": H200_CONSTANTS.source, "rows": rows,
            "ranking": ranking, "summary_multi_gpu": summary}


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
                      f"{s['pairs']}; fastest layout right for {s['fastest_right']} of {s['configs']} configs"]
    for config, v in rep["ranking"].items():
        lines.append(f"- {config}: {v['agreeing']}/{v['pairs']} pairs; fastest measured {v['fastest_measured']}, "
                     f"predicted {v['fastest_predicted']}")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("files", nargs="+", type=Path)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args(argv)
    return run_report("mesh_report", lambda: report(args.files), format_report, args.out)


if __name__ == "__main__":
    sys.exit(main())
