"""bench/mesh_runs.py --cpu-dry-run as a user runs it, at its smallest (2 gloo ranks, one config, ~7 s):
the launches, the parity against the 1-rank run, the comm split, the planner columns and the all-to-all
rows all end up in mesh_runs.json. Larger dry runs (4 and 8 ranks) are in docs/benchmarks.md."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_dry_run_two_ranks(tmp_path: Path):
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src")}
    proc = subprocess.run([sys.executable, str(ROOT / "bench" / "mesh_runs.py"), "--cpu-dry-run", "--gpus", "2",
                           "--layouts", "1,2,1", "--planner-top", "1", "--configs", "mixtral-shaped",
                           "--out", str(tmp_path)], env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    report = json.loads((tmp_path / "mesh_runs.json").read_text())
    assert report["errors"] == [] and [launch["failure"] for launch in report["launches"]] == [None, None]
    top = report["planner"]["mixtral-shaped"]["top_layouts"][0]
    runs = report["runs"]
    assert {"mixtral-shaped/1x1x1", "mixtral-shaped/1x2x1", f"mixtral-shaped/{top['dp']}x{top['ep']}x{top['tp']}"} \
        == set(runs)
    ep = runs["mixtral-shaped/1x2x1"]
    assert ep["parity"]["passed"] and ep["parity"]["steps"] == 4 and ep["parity"]["tolerance"] == 1e-5
    assert len(ep["losses"]) == 4 and ep["tokens_per_s"] > 0 and 0 < ep["scaling_efficiency"]
    assert ep["prediction"]["terms_ms"]["ep_alltoall"] > 0 and ep["predicted_vs_measured"]["step_ms"][1] == ep["step_ms"]
    assert len(ep["split_per_rank"]) == 2
    split = ep["split_rank0"]
    assert split["comm_ms"]["ep"] > 0 and split["comm_ms"]["tp"] == 0 and 0 < split["compute_share"] < 1
    assert [row["mb_per_rank"] for row in report["a2a"]["rows"]] == [0.0625, 0.25] and report["a2a"]["ep"] == 2
