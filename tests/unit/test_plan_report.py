"""bench/plan_report.py on a small fixture: predictions of the current planner against made-up
measurements whose errors and ranking agreement are known by construction."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from moemesh.config import load_config

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "bench"))

import plan_report  # noqa: E402
from plan_validate import HELDOUT  # noqa: E402


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
        runs[label] = {"set": "heldout", "overrides": HELDOUT[label],
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
