"""`moemesh plan` as a user runs it: a table, --json, and every bad input as one line with exit 2."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[2] / "src"


def moemesh(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "moemesh", *args], cwd=cwd, env={**os.environ, "PYTHONPATH": str(SRC)},
                          capture_output=True, text=True, timeout=120)


def test_plan_json(tmp_path: Path):
    proc = moemesh("plan", "gpu", "--gpus", "16", "--set", "train.global_batch=64", "--json", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout)
    plans = out["plans"]
    assert plans and all(p["dp"] * p["ep"] * p["tp"] == 16 for p in plans)
    assert [p["step_s"] for p in plans] == sorted(p["step_s"] for p in plans)
    assert out["feasible"] <= out["evaluated"]


@pytest.mark.parametrize("args, message", [
    (["gpu", "--gpus", "8", "--gpu", "tpu"], "--gpu 'tpu' is not a known GPU"),
    (["tiny", "--gpus", "7"], "no (dp, ep, tp) with dp*ep*tp=7"),
    (["gpu", "--gpus", "1", "--set", "model.n_layers=400"], "needs >= "),
    (["gpu", "--gpus", "1", "--calibrate", "nothere.json"], "no such file"),
    (["gpu", "--gpus", "1", "--calibrate", "bad.json"], "not a GPU benchmark of this project"),
    (["gpu", "--gpus", "1", "--calibrate", "v2.json"], "no calibration run with kernel times per class"),
])
def test_bad_input(tmp_path: Path, args, message):
    (tmp_path / "bad.json").write_text("[1, 2]")
    (tmp_path / "v2.json").write_text((SRC.parent / "bench" / "results" / "plan_validate_v2.json").read_text())
    proc = moemesh("plan", *args, cwd=tmp_path)
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1, proc.stderr
    assert proc.stderr.startswith("moemesh: error: plan: ") and message in proc.stderr, proc.stderr
    assert proc.stdout == ""


def test_validation_dry_run_then_offline_report(tmp_path: Path):
    """bench/plan_validate.py's plumbing on CPU (tiny configs, one per list, each in a child process, each
    profiled: no device kernels on a CPU, so every class is 0), then bench/plan_report.py on what it wrote,
    with the shipped constants and with a fit."""
    bench = SRC.parent / "bench"
    env = {**os.environ, "PYTHONPATH": str(SRC)}
    proc = subprocess.run([sys.executable, str(bench / "plan_validate.py"), "--cpu-dry-run", "--which", "all",
                           "--limit", "1", "--out", str(tmp_path)], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    runs = json.loads((tmp_path / "plan_validate.json").read_text())["runs"]
    assert sorted(r["set"] for r in runs.values()) == ["calibration", "heldout"]
    assert all(r["measured_step_ms"] > 0 and "train.device=cpu" in r["overrides"] for r in runs.values())
    assert all(r["profile"]["same_trainer"] and r["profile"]["busy_ms"] == 0 and r["profile"]["window_ms"] > 0
               and all(c["ms"] == 0 for c in r["profile"]["classes"].values()) for r in runs.values())
    for constants in ("shipped", "fit"):
        proc = subprocess.run([sys.executable, str(bench / "plan_report.py"), str(tmp_path / "plan_validate.json"),
                               "--constants", constants, "--out", str(tmp_path / "report.json")], env=env,
                              capture_output=True, text=True, timeout=120)
        assert proc.returncode == 0, proc.stderr
        report = json.loads((tmp_path / "report.json").read_text())
        assert set(report["summary"]) == {"calibration", "heldout"} and len(report["rows"]) == 2
        assert "## heldout (1 configs)" in proc.stdout and "| idle |" in proc.stdout


def test_a_reader_that_leaves_early_gets_no_traceback(tmp_path: Path):
    """`moemesh plan ... | head -1`: the output's reader is gone (here before the first write); the command
    ends quietly with the shell's status for SIGPIPE."""
    read_end, write_end = os.pipe()
    os.close(read_end)
    try:
        proc = subprocess.run([sys.executable, "-m", "moemesh", "plan", "gpu", "--gpus", "8", "--set",
                               "train.global_batch=64"], cwd=tmp_path, env={**os.environ, "PYTHONPATH": str(SRC)},
                              stdout=write_end, stderr=subprocess.PIPE, text=True, timeout=120)
    finally:
        os.close(write_end)
    assert proc.returncode == 141 and proc.stderr == ""


def test_a_host_bound_winner_says_to_calibrate(tmp_path: Path):
    """The `gpu` preset on 4 GPUs launched op by op (a mesh's default) is host-bound at every layout: the
    explanation names that and the remedy; with its steps replayed as CUDA graphs where they can be
    (`train.cuda_graph=on`), or on one GPU, it does not."""
    four = moemesh("plan", "gpu", "--gpus", "4", cwd=tmp_path)
    assert four.returncode == 0, four.stderr
    assert "largest term is host-bound idle" in four.stdout and "calibrate on yours (bench/mesh_sweep.sh" in four.stdout
    assert "train.cuda_graph=on replays the step as one CUDA graph" in four.stdout
    graphed = moemesh("plan", "gpu", "--gpus", "4", "--set", "train.cuda_graph=on", cwd=tmp_path)
    assert graphed.returncode == 0 and "calibrate on yours" not in graphed.stdout
    assert "largest term is host-bound idle" not in graphed.stdout
    assert "validated on 2 GPUs only, not yet on 4" in graphed.stdout
    one = moemesh("plan", "gpu", "--gpus", "1", cwd=tmp_path)
    assert one.returncode == 0 and "calibrate on yours" not in one.stdout
    skeleton = SRC.parent / "bench" / "results" / "mesh_skeleton_x2.json"  # calibrated: no advice to calibrate
    mine = moemesh("plan", "gpu", "--gpus", "4", "--calibrate", str(skeleton), cwd=tmp_path)
    assert mine.returncode == 0 and "host-bound idle" in mine.stdout and "calibrate on yours" not in mine.stdout
