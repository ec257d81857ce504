"""Offline evaluation of `moemesh plan` against bench/plan_validate.py's measurements, on CPU:

  1. fit the constants on the runs of set 'calibration' only, one term at a time against its kernel
     class's measured time (plan/cost.py:fit_runs; needs format 3, which has a profile per run), or take
     the shipped ones (--constants shipped: any format);
  2. predict every run with the current planner (the candidate `moemesh plan --gpus 1` ranks for the
     config at (dp, ep, tp) = (1, 1, 1) with its checkpointing mode): step time, its terms, and the
     allocated peak that torch.cuda.max_memory_allocated measures (the CUDA context is not in it);
  3. print, per set, predicted vs measured with relative errors (predicted / measured - 1) and the
     summary: mean absolute and worst error, memory worst, Spearman and pairwise ranking agreement; and,
     where the runs were profiled, each term against its class (idle: the step time no kernel covers),
     as milliseconds and as a share of the measured step (what the class's misfit costs the total).

    python bench/plan_report.py RESULTS.json [MORE.json ...] [--constants fit|shipped] [--out report.json]
                                [--fit-also EARLIER.json ...]

Older files (format 2, the first plan_validate.json, train_e2e.json: no profile; runs without a set count
as calibration) give the step-time and memory tables with --constants shipped; fitting them is refused
with one line (exit 2).
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


def term_summary(rows: list[dict]) -> dict:
    """Per compute term, over rows with measured terms: mean measured and predicted ms, mean absolute
    misfit as a share of the measured step, the summed relative error, and the worst config."""
    from moemesh.plan.cost import TERMS

    rows = [r for r in rows if r.get("measured_terms_ms")]
    out = {}
    for term in TERMS if rows else ():
        share = {r["label"]: (r["predicted_terms_ms"][term] - r["measured_terms_ms"][term]) / r["measured_step_ms"]
                 for r in rows}
        worst = max(share, key=lambda label: abs(share[label]))
        measured = sum(r["measured_terms_ms"][term] for r in rows)
        predicted = sum(r["predicted_terms_ms"][term] for r in rows)
        out[term] = {"measured_ms_mean": measured / len(rows), "predicted_ms_mean": predicted / len(rows),
                     "mae_share_of_step": statistics.fmean(abs(v) for v in share.values()),
                     "sum_error": predicted / measured - 1 if measured > 0 else None,
                     "worst_config": worst, "worst_share_of_step": share[worst]}
    return out


def report(paths: list[Path], constants_choice: str = "fit", fit_also: tuple[Path, ...] = ()) -> dict:
    """`fit_also`: files whose calibration runs join the fit, but whose runs are not tabulated (an earlier
    protocol's measurements, whose held-out configs were spent)."""
    from moemesh.plan.cost import GPUS, H200_CONSTANTS, TERMS, fit_runs, load_runs

    runs = [r for p in paths for r in load_runs(p)]
    calibration = [r for p in fit_also for r in load_runs(p) if r.set == "calibration"]
    calibration += [r for r in runs if r.set == "calibration"]
    names = " + ".join(map(str, [*fit_also, *paths]))
    constants = (fit_runs(calibration, GPUS["h200"], names)
                 if constants_choice == "fit" else H200_CONSTANTS)
    rows = []
    for r in runs:
        p = predict([*r.overrides, *([] if r.graphed else ["train.cuda_graph=off"])], constants)  # as it ran
        ckpt = next((o.split("=", 1)[1] for o in r.overrides if o.startswith("train.activation_checkpointing=")), "none")
        row = {"label": r.label, "set": r.set, "ckpt": ckpt, "measured_step_ms": r.step_s * 1e3,
               "predicted_step_ms": p["step_ms"], "err_step": p["step_ms"] / (r.step_s * 1e3) - 1,
               "measured_memory_gib": r.memory_gib, "predicted_memory_gib": p["memory_gib"],
               "err_memory": p["memory_gib"] / r.memory_gib - 1 if r.memory_gib else None,
               "predicted_terms_ms": p["terms_ms"],
               "measured_terms_ms": {t: r.term_s(t) * 1e3 for t in TERMS} if r.kernel_s is not None else None}
        rows.append(row)
    sets = sorted({r["set"] for r in rows})
    return {"files": [str(p) for p in paths], "fit_also": [str(p) for p in fit_also], "constants": {k: v for k, v in vars(constants).items()},
            "fitted_runs": sum(r.kernel_s is not None for r in calibration) if constants_choice == "fit" else 0,
            "rows": rows, "summary": {s: summarize([r for r in rows if r["set"] == s]) for s in sets},
            "terms": {s: term_summary([r for r in rows if r["set"] == s]) for s in sets}}


def _terms_table(rows: list[dict]) -> list[str]:
    from moemesh.plan.cost import TERMS

    rows = [r for r in rows if r.get("measured_terms_ms")]
    if not rows:
        return []
    lines = ["", "measured / predicted ms per step, by term (idle: the step time no kernel covers)", "",
             "| config | " + " | ".join(TERMS) + " |", "|---|" + "---|" * len(TERMS)]
    for r in rows:
        lines.append(f"| {r['label']} | " + " | ".join(f"{r['measured_terms_ms'][t]:.1f} / {r['predicted_terms_ms'][t]:.1f}"
                                                       for t in TERMS) + " |")
    return lines


def format_report(rep: dict) -> str:
    lines = ["constants: " + ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}"
                                       for k, v in rep["constants"].items())]
    for name, summary in rep["summary"].items():
        lines += ["", f"## {name} ({summary['n']} configs)", "",
                  "| config | ckpt | measured ms | predicted ms | error | measured GiB | predicted GiB | error |",
                  "|---|---|---|---|---|---|---|---|"]
        rows = [r for r in rep["rows"] if r["set"] == name]
        for r in rows:
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
        lines += _terms_table(rows)
        if rep["terms"].get(name):
            lines += ["", "| term | measured ms (mean) | predicted ms (mean) | summed error | misfit, mean abs "
                          "(share of step) | worst (share of step) |", "|---|---|---|---|---|---|"]
        for term, t in rep["terms"].get(name, {}).items():
            err = f"{t['sum_error']:+.1%}" if t["sum_error"] is not None else "-"
            lines.append(f"| {term} | {t['measured_ms_mean']:.1f} | {t['predicted_ms_mean']:.1f} | {err} | "
                         f"{t['mae_share_of_step']:.1%} | {t['worst_share_of_step']:+.1%} ({t['worst_config']}) |")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("files", nargs="+", type=Path)
    parser.add_argument("--constants", choices=("fit", "shipped"), default="fit")
    parser.add_argument("--out", type=Path, help="also write the report as JSON here")
    parser.add_argument("--fit-also", type=Path, nargs="*", default=[],
                        help="files whose calibration runs join the fit without being tabulated")
    args = parser.parse_args(argv)
    return run_report("plan_report", lambda: report(args.files, args.constants, tuple(args.fit_also)), format_report,
                      args.out)


def run_report(name: str, make, fmt, out: Path | None) -> int:
    """Print `fmt(make())` (and write it as JSON to `out`); a UserError is one line on stderr, exit 2."""
    from moemesh.errors import UserError

    try:
        rep = make()
    except UserError as exc:
        print(f"{name}: {exc}", file=sys.stderr)
        return 2
    print(fmt(rep))
    if out:
        out.write_text(json.dumps(rep, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
