"""Offline evaluation of `moemesh plan` against bench/plan_validate.py's measurements, on CPU:

  1. fit the constants on the runs of set 'calibration' only (plan/cost.py:fit_runs), or take the
     shipped ones (--constants shipped);
  2. predict every run with the current planner (the candidate `moemesh plan --gpus 1` ranks for the
     config at (dp, ep, tp) = (1, 1, 1) with its checkpointing mode): step time and the allocated peak
     that torch.cuda.max_memory_allocated measures (the CUDA context is not in it);
  3. print, per set, predicted vs measured with relative errors (predicted / measured - 1) and the
     summary: mean absolute and worst error, memory worst, Spearman and pairwise ranking agreement.

    python bench/plan_report.py RESULTS.json [MORE.json ...] [--constants fit|shipped] [--out report.json]

Runs of older files without a set (bench/results/plan_validate.json of the first validation,
train_e2e.json) count as calibration.
"""

from __future__ import annotations

import argparse
import itertools
import json
import statistics
import sys
from pathlib import Path

TARGETS = {"step_mae": 0.05, "step_worst": 0.15, "memory_worst": 0.10}


def predict(overrides: list[str], constants) -> dict:
    from moemesh.config import load_config
    from moemesh.plan.cost import GPUS
    from moemesh.plan.memory import GIB
    from moemesh.plan.search import IMBALANCE, enumerate_plans

    cfg = load_config("gpu", overrides)
    (c,) = [c for c in enumerate_plans(cfg, 1, 8, GPUS["h200"], constants, IMBALANCE, sharded_init=True)
            if c.recompute == cfg.train.activation_checkpointing]
    return {"step_ms": c.step_s * 1e3, "memory_gib": c.memory / GIB,
            "terms_ms": {k: v * 1e3 for k, v in c.terms.items()}}


def ranks(xs: list[float]) -> list[float]:
    order = sorted(range(len(xs)), key=lambda i: xs[i])
    out = [0.0] * len(xs)
    for r, i in enumerate(order):
        out[i] = float(r)
    return out


def summarize(rows: list[dict]) -> dict:
    """Errors and ranking agreement of rows with 'label', 'err_step', 'err_memory' (or None),
    'measured_step_ms', 'predicted_step_ms'."""
    if not rows:
        return {"n": 0}
    es = [r["err_step"] for r in rows]
    worst = max(rows, key=lambda r: abs(r["err_step"]))
    out = {"n": len(rows), "step_mae": statistics.fmean(abs(e) for e in es), "step_mean_signed": statistics.fmean(es),
           "step_worst": worst["err_step"], "step_worst_config": worst["label"]}
    mem = [r for r in rows if r.get("err_memory") is not None]
    if mem:
        mw = max(mem, key=lambda r: abs(r["err_memory"]))
        out.update({"memory_mae": statistics.fmean(abs(r["err_memory"]) for r in mem),
                    "memory_mean_signed": statistics.fmean(r["err_memory"] for r in mem),
                    "memory_worst": mw["err_memory"], "memory_worst_config": mw["label"]})
    n = len(rows)
    if n >= 2:
        meas, pred = [r["measured_step_ms"] for r in rows], [r["predicted_step_ms"] for r in rows]
        rm, rp = ranks(meas), ranks(pred)
        out["spearman_step"] = 1 - 6 * sum((a - b) ** 2 for a, b in zip(rm, rp)) / (n * (n * n - 1))
        pairs = list(itertools.combinations(range(n), 2))
        out["pairwise_agreement_step"] = sum((meas[i] - meas[j]) * (pred[i] - pred[j]) > 0 for i, j in pairs) / len(pairs)
        out["discordant_pairs"] = [[rows[i]["label"], rows[j]["label"]] for i, j in pairs
                                   if (meas[i] - meas[j]) * (pred[i] - pred[j]) <= 0]
    out["met"] = {"step_mae": out["step_mae"] <= TARGETS["step_mae"],
                  "step_worst": abs(out["step_worst"]) <= TARGETS["step_worst"],
                  "memory_worst": bool(mem) and abs(out["memory_worst"]) <= TARGETS["memory_worst"]}
    return out


def report(paths: list[Path], constants_choice: str = "fit") -> dict:
    from moemesh.plan.cost import GPUS, H200_CONSTANTS, fit_runs, load_runs

    runs = [r for p in paths for r in load_runs(p)]
    calibration = [r for r in runs if r.set == "calibration"]
    constants = (fit_runs(calibration, GPUS["h200"], source="fitted to the calibration runs of "
                          + " + ".join(map(str, paths))) if constants_choice == "fit" else H200_CONSTANTS)
    rows = []
    for r in runs:
        p = predict(r.overrides, constants)
        ckpt = next((o.split("=", 1)[1] for o in r.overrides if o.startswith("train.activation_checkpointing=")), "none")
        row = {"label": r.label, "set": r.set, "ckpt": ckpt, "measured_step_ms": r.step_s * 1e3,
               "predicted_step_ms": p["step_ms"], "err_step": p["step_ms"] / (r.step_s * 1e3) - 1,
               "measured_memory_gib": r.memory_gib, "predicted_memory_gib": p["memory_gib"],
               "err_memory": p["memory_gib"] / r.memory_gib - 1 if r.memory_gib else None,
               "predicted_terms_ms": p["terms_ms"]}
        rows.append(row)
    sets = sorted({r["set"] for r in rows})
    return {"files": [str(p) for p in paths], "constants": {k: v for k, v in vars(constants).items()},
            "rows": rows, "summary": {s: summarize([r for r in rows if r["set"] == s]) for s in sets}}


def format_report(rep: dict) -> str:
    lines = ["constants: " + ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}"
                                       for k, v in rep["constants"].items())]
    for name, summary in rep["summary"].items():
        lines += ["", f"## {name} ({summary['n']} configs)", "",
                  "| config | ckpt | measured ms | predicted ms | error | measured GiB | predicted GiB | error |",
                  "|---|---|---|---|---|---|---|---|"]
        for r in (r for r in rep["rows"] if r["set"] == name):
            mm = f"{r['measured_memory_gib']:.2f}" if r["measured_memory_gib"] else "-"
            em = f"{r['err_memory']:+.1%}" if r["err_memory"] is not None else "-"
            lines.append(f"| {r['label']} | {r['ckpt']} | {r['measured_step_ms']:.1f} | {r['predicted_step_ms']:.1f} | "
                         f"{r['err_step']:+.1%} | {mm} | {r['predicted_memory_gib']:.2f} | {em} |")
        if summary["n"]:
            s = summary
            lines += ["", f"step time: MAE {s['step_mae']:.1%} (mean signed {s['step_mean_signed']:+.1%}), worst "
                          f"{s['step_worst']:+.1%} ({s['step_worst_config']})"]
            if "memory_worst" in s:
                lines.append(f"peak memory: MAE {s['memory_mae']:.1%}, worst {s['memory_worst']:+.1%} "
                             f"({s['memory_worst_config']})")
            if "spearman_step" in s:
                lines.append(f"ranking: Spearman {s['spearman_step']:.3f}, pairwise agreement "
                             f"{s['pairwise_agreement_step']:.1%} ({len(s['discordant_pairs'])} discordant pairs)")
            lines.append("targets met: " + ", ".join(f"{k} {'yes' if v else 'no'}" for k, v in s["met"].items()))
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("files", nargs="+", type=Path)
    parser.add_argument("--constants", choices=("fit", "shipped"), default="fit")
    parser.add_argument("--out", type=Path, help="also write the report as JSON here")
    args = parser.parse_args(argv)
    from moemesh.errors import UserError

    try:
        rep = report(args.files, args.constants)
    except UserError as exc:
        print(f"plan_report: {exc}", file=sys.stderr)
        return 2
    print(format_report(rep))
    if args.out:
        args.out.write_text(json.dumps(rep, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
