"""bench/plan_report.py on small fixtures: predictions of the current planner against made-up
measurements whose errors and ranking agreement are known by construction; a synthetic profiled file
(kernel-class times from known constants) from which the report's fit recovers the constants and whose
per-term and total errors are known."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from moemesh.config import load_config

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "bench"))

import plan_report  # noqa: E402
from plan_validate import CALIBRATION, HELDOUT  # noqa: E402

from tests.unit.test_plan import TRUTH, write_measurements  # noqa: E402


@pytest.fixture
def fixture_file(tmp_path: Path):
    from moemesh.plan.cost import H200_CONSTANTS

    labels = list(HELDOUT)[:3]
    predicted = {label: plan_report.predict(HELDOUT[label], H200_CONSTANTS) for label in labels}
    a, b, c = sorted(labels, key=lambda label: predicted[label]["step_ms"])
    measured_s = {a: 2.0, b: 1.0, c: 3.0}  # a and b swap places: 1 of the 3 pairs disagrees
    runs = {}
    for label in labels:
        cfg = load_config("gpu", HELDOUT[label])
        runs[label] = {"set": "heldout", "overrides": HELDOUT[label], "measured": {"cuda_graph": True},
                       "tokens_per_s": cfg.train.global_batch * cfg.train.seq_len / measured_s[label],
                       "measured_memory_gib": predicted[label]["memory_gib"] * (1.25 if label == c else 1.0)}
    path = tmp_path / "fixture.json"
    path.write_text(json.dumps({"gpu": "fixture", "runs": runs}))
    return path, predicted, measured_s, c


def test_report_errors_and_ranking(fixture_file, tmp_path: Path, capsys):
    path, predicted, measured_s, off = fixture_file
    assert plan_report.main([str(path), "--constants", "shipped", "--out", str(tmp_path / "r.json")]) == 0
    rep = json.loads((tmp_path / "r.json").read_text())
    errors = {label: predicted[label]["step_ms"] / (measured_s[label] * 1e3) - 1 for label in measured_s}
    for row in rep["rows"]:
        assert row["err_step"] == pytest.approx(errors[row["label"]], rel=1e-9)
        assert row["err_memory"] == pytest.approx(1 / 1.25 - 1 if row["label"] == off else 0.0, abs=1e-12)
    s = rep["summary"]["heldout"]
    assert s["n"] == 3 and s["step_mae"] == pytest.approx(sum(abs(e) for e in errors.values()) / 3)
    assert s["step_worst"] == max(errors.values(), key=abs)
    assert s["memory_worst"] == pytest.approx(-0.2) and s["memory_worst_config"] == off
    assert s["pairwise_agreement_step"] == pytest.approx(2 / 3) and s["spearman_step"] == pytest.approx(0.5)
    assert not s["met"]["memory_worst"]
    out = capsys.readouterr().out
    assert "## heldout (3 configs)" in out and "pairwise agreement 66.7%" in out


def test_report_bad_file(tmp_path: Path, capsys):
    (tmp_path / "x.json").write_text("[1]")
    assert plan_report.main([str(tmp_path / "x.json")]) == 2
    assert capsys.readouterr().err.count("\n") == 1


def test_report_fits_each_term_and_summarizes(tmp_path: Path, capsys):
    """Calibration runs measured exactly as TRUTH predicts, held-out runs off by known factors (every term
    and the step alike), steps replayed as CUDA graphs; steps launched op by op in a file that only joins
    the fit (--fit-also): the fit gives TRUTH back (both idle pairs), calibration errors are 0, each
    held-out row's step and term errors are its factor's, and the --fit-also file's runs are not tabulated."""
    from moemesh.plan.cost import MESH, PARAMS, TERMS

    errors = {label: e for label, e in zip(list(HELDOUT)[:4], (0.10, -0.20, 0.05, 0.0))}
    runs = {label: ("calibration", o, TRUTH, 1.0) for label, o in CALIBRATION.items()}
    runs.update({label: ("heldout", HELDOUT[label], TRUTH, 1 / (1 + e)) for label, e in errors.items()})
    write_measurements(tmp_path / "m.json", runs, graphed=True)
    write_measurements(tmp_path / "eager.json", {f"eager-{label}": ("calibration", o, TRUTH, 1.0)
                                                 for label, o in CALIBRATION.items()})
    assert plan_report.main([str(tmp_path / "m.json"), "--out", str(tmp_path / "r.json"),
                             "--fit-also", str(tmp_path / "eager.json")]) == 0
    rep = json.loads((tmp_path / "r.json").read_text())
    for name in (n for n in PARAMS if n not in MESH):  # single-GPU runs only: no mesh constant
        assert rep["constants"][name] == pytest.approx(getattr(TRUTH, name), rel=1e-6), name
    assert rep["fitted_runs"] == 2 * len(CALIBRATION) and not any(r["label"].startswith("eager-") for r in rep["rows"])
    calibration, held = rep["summary"]["calibration"], rep["summary"]["heldout"]
    assert calibration["n"] == len(CALIBRATION) and calibration["step_mae"] < 1e-9
    assert all(t["mae_share_of_step"] < 1e-9 for t in rep["terms"]["calibration"].values())
    assert held["step_mae"] == pytest.approx(0.0875) and held["step_worst"] == pytest.approx(-0.20)
    for row in (r for r in rep["rows"] if r["set"] == "heldout"):
        assert row["err_step"] == pytest.approx(errors[row["label"]], abs=1e-9)
        for term in TERMS:
            assert row["predicted_terms_ms"][term] == pytest.approx(row["measured_terms_ms"][term]
                                                                    * (1 + errors[row["label"]]), rel=1e-9), term
    out = capsys.readouterr().out
    assert "measured / predicted ms per step, by term" in out and "| grouped_gemm |" in out


def test_report_reads_the_previous_format(capsys):
    """plan_validate_v2.json (no profile): evaluated with the shipped constants (all 29 runs, totals only:
    it has no kernel classes); a fit on it is refused in one line."""
    v2 = ROOT / "bench" / "results" / "plan_validate_v2.json"
    rep = plan_report.report([v2], "shipped")
    assert rep["summary"]["heldout"]["n"] == 13 and rep["summary"]["calibration"]["n"] == 16
    assert 0 < rep["summary"]["heldout"]["step_mae"] < 1 and not rep["terms"]["heldout"]
    assert plan_report.main([str(v2)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "kernel times per class" in err


def test_mesh_report_on_a_synthetic_file_and_bad_input(tmp_path: Path, capsys):
    """bench/mesh_report.py: runs measured exactly as the shipped constants predict have no error and every
    layout pair in order; a file that is not mesh_runs.py's output is one line, exit 2."""
    import mesh_report
    from moemesh.plan.cost import H200_CONSTANTS

    from tests.unit.test_plan import write_mesh_measurements

    configs = {"gpu": [], "d2048": ["model.n_layers=4", "model.dim=2048", "model.n_heads=16", "model.n_kv_heads=4"]}
    write_mesh_measurements(tmp_path / "mesh.json", [(1, 1, 1), (2, 1, 1), (1, 2, 1), (1, 1, 2)], configs,
                            H200_CONSTANTS)
    rep = mesh_report.report([tmp_path / "mesh.json"])
    s = rep["summary_multi_gpu"]
    assert s["runs"] == 6 and s["step_mae"] < 1e-9 and s["pairs_agreeing"] == s["pairs"] == 6
    assert s["fastest_right"] == s["configs"] == 2
    assert s["pairs_apart"] == s["pairs_apart_agreeing"] == 6  # no per-step times: every pair counts
    assert list(rep["summary_by_launch"]) == ["op_by_op"] and rep["summary_by_launch"]["op_by_op"]["runs"] == 6
    # steps replayed as CUDA graphs (the default at ep=1) are predicted as graphs, op-by-op ones as they ran
    write_mesh_measurements(tmp_path / "graphs.json", [(2, 1, 1), (1, 1, 2)], configs, H200_CONSTANTS, graphed=True)
    both = mesh_report.report([tmp_path / "mesh.json", tmp_path / "graphs.json"])["summary_by_launch"]
    assert both["cuda_graph"]["runs"] == 4 and both["cuda_graph"]["step_mae"] < 1e-9
    assert both["op_by_op"]["runs"] == 6 and both["op_by_op"]["step_mae"] < 1e-9
    assert mesh_report.main([str(ROOT / "bench" / "results" / "plan_validate_v4.json")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "not bench/mesh_runs.py's output" in err


def test_layouts_measured_apart_only_beyond_their_steps_variation():
    """The exact two-sided Mann-Whitney U test of bench/mesh_report.py: 7 steps each, wholly separated, are
    apart (p = 2/3432); interleaved ones, or a shift inside the spread, are not; without steps a pair counts."""
    import math

    import mesh_report

    assert sum(mesh_report._u_counts(7, 7)) == math.comb(14, 7)
    low = [100.0 + i for i in range(7)]
    assert mesh_report.apart(low, [x + 7 for x in low]) and mesh_report.apart([x + 7 for x in low], low)
    assert not mesh_report.apart(low, [x + 0.5 for x in low]) and not mesh_report.apart(low, low)
    assert mesh_report.apart([1.0, 2.0], [3.0]) is False  # too few steps to tell: p = 2/3
    assert mesh_report.apart([], [1.0])
