"""Runs that cannot fit in memory are refused before anything is allocated or any process starts:
one line naming what is needed and what the machine has, exit 2, nothing written. The estimate itself
is checked against the placement table's real shard sizes in tests/unit/test_memory.py."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest


@pytest.mark.parametrize("items, expected", [
    (["model.dim=16384", "model.n_heads=128", "model.n_kv_heads=8"], "GiB of host memory"),
    (["train.global_batch=1000000000"], "GiB of host memory"),
    (["parallel.dp=64", "train.global_batch=64"], "for 64 local rank(s)"),
], ids=["dim-16384", "batch-1e9", "64-cpu-ranks"])
def test_run_too_big_for_this_machine_is_refused(tmp_path: Path, items, expected):
    args = [a for item in [*items, "run.dir=run"] for a in ("--set", item)]
    proc = subprocess.run([sys.executable, "-m", "moemesh", "train", *args], cwd=tmp_path, capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("moemesh: error: the run needs ≈"), proc.stderr
    assert expected in lines[0] and "this machine has" in lines[0]
    assert list(tmp_path.iterdir()) == []
