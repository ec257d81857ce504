"""`moemesh plot` and `moemesh draw` through the CLI, as a user runs them; a 2-rank `moemesh train`
leaves mesh.png in its run dir."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[2] / "src"


def moemesh(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(SRC)}
    return subprocess.run([sys.executable, "-m", "moemesh", *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=300)


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> Path:
    """A real 20-step run at (1, 2, 1) with validation: metrics.jsonl with val_loss and expert_load."""
    base = tmp_path_factory.mktemp("plot")
    proc = moemesh("train", "--set", "train.steps=20", "--set", "run.log_every=2", "--set", "run.eval_every=10",
                   "--set", "run.eval_batches=1", "--set", "parallel.ep=2", "--set", "run.progress=false",
                   "--set", "run.tensorboard=false", "--set", "run.checkpoints=false", "--set", "run.dir=run",
                   cwd=base)
    assert proc.returncode == 0, proc.stderr
    return base / "run"


def test_train_saves_the_mesh_drawing(run_dir: Path):
    assert (run_dir / "mesh.png").stat().st_size > 10_000


def test_plot_into_run_dir_and_elsewhere(run_dir: Path, tmp_path: Path):
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert any("val_loss" in r for r in records) and all("expert_load" in r for r in records)
    proc = moemesh("plot", str(run_dir), cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    for name in ("loss.png", "expert_load.png"):
        assert 10_000 < (run_dir / name).stat().st_size < 1_000_000
    proc = moemesh("plot", str(run_dir), "-o", "pictures", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert sorted(p.name for p in (tmp_path / "pictures").iterdir()) == ["expert_load.png", "loss.png"]


def test_plot_and_draw_bad_input(tmp_path: Path):
    (tmp_path / "empty").mkdir()
    (tmp_path / "garbage").mkdir()
    (tmp_path / "garbage" / "metrics.jsonl").write_text("not json\n")
    cases = [(["plot", "missing"], "no such run dir"), (["plot", "empty"], "has no metrics.jsonl"),
             (["plot", "garbage"], "line 1 is not JSON"), (["draw", "--ep", "3", "--experts", "8"], "not divisible"),
             (["draw", "--dp", "-1"], "--dp=-1 must be >= 1"), (["draw", "-o", "mesh.jpg"], ".png or .svg")]
    for args, message in cases:
        before = sorted(p.name for p in tmp_path.rglob("*"))
        proc = moemesh(*args, cwd=tmp_path)
        assert proc.returncode == 2 and proc.stderr.count("\n") == 1, (args, proc.stderr)
        assert proc.stderr.startswith("moemesh: error: ") and message in proc.stderr, (args, proc.stderr)
        assert sorted(p.name for p in tmp_path.rglob("*")) == before


def test_draw_from_a_config(tmp_path: Path):
    proc = moemesh("draw", "tiny", "--set", "parallel.dp=2", "--set", "parallel.tp=2", "-o", "m.svg", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    svg = (tmp_path / "m.svg").read_text()
    assert "dp=2 × ep=1 × tp=2" in svg and "E0–3 (F/2)" in svg
