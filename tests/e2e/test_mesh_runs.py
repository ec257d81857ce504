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


def test_a_launch_per_job_without_profile_then_merged(tmp_path: Path):
    """bench/mesh_sweep.sh's way: each layout in its own launch, no 1-rank run, no profile; then
    bench/mesh_merge.py keys the runs by the directory's label, and the planner can fit on the merged file."""
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src")}
    out = tmp_path / "sweep" / "tiny-mixtral"
    proc = subprocess.run([sys.executable, str(ROOT / "bench" / "mesh_runs.py"), "--cpu-dry-run", "--gpus", "2",
                           "--layouts", "2,1,1;1,1,2", "--configs", "mixtral-shaped", "--launch-per-job", "--no-single",
                           "--no-a2a", "--profile-steps", "0", "--out", str(out)],
                          env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    report = json.loads((out / "mesh_runs.json").read_text())
    assert [(launch["world"], launch["jobs"]) for launch in report["launches"]] == [
        (2, ["mixtral-shaped/2x1x1"]), (2, ["mixtral-shaped/1x1x2"])]
    assert all(run["split_rank0"] is None and run["step_ms"] > 0 for run in report["runs"].values())
    merged = tmp_path / "merged.json"
    subprocess.run([sys.executable, str(ROOT / "bench" / "mesh_merge.py"), str(merged), str(out / "mesh_runs.json")],
                   check=True, timeout=60)
    data = json.loads(merged.read_text())
    assert set(data["runs"]) == {"tiny-mixtral/2x1x1", "tiny-mixtral/1x1x2"} and len(data["launches"]) == 2
    from moemesh.plan.cost import is_mesh_runs, load_mesh_runs

    runs = load_mesh_runs(merged)
    assert is_mesh_runs(merged) and {r.layout for r in runs} == {(2, 1, 1), (1, 1, 2)}
    assert all(len(r.steps_s) == report["steps"] - report["warmup"] for r in runs)
    bad = subprocess.run([sys.executable, str(ROOT / "bench" / "mesh_merge.py"), str(tmp_path / "bad.json"),
                          str(out / "mesh_runs.json"), str(tmp_path / "missing" / "mesh_runs.json")],
                         capture_output=True, text=True, timeout=60)
    assert bad.returncode == 2 and bad.stderr.count("\n") == 1 and "missing" in bad.stderr
    assert not (tmp_path / "bad.json").exists()


def test_host_probe_dry_run(tmp_path: Path):
    """bench/host_probe.py on 2 gloo ranks: step and host time per layout, and a profile of rank 0's host."""
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src")}
    proc = subprocess.run([sys.executable, str(ROOT / "bench" / "host_probe.py"), "--cpu-dry-run", "--gpus", "2",
                           "--configs", "skeleton-L2", "--steps", "3", "--warmup", "1", "--profile-steps", "1",
                           "--out", str(tmp_path)], env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    runs = json.loads((tmp_path / "host_probe.json").read_text())["runs"]
    assert set(runs) == {f"skeleton-L2/{layout}" for layout in ("1x1x1", "2x1x1", "1x2x1", "1x1x2")}
    for run in runs.values():
        assert 0 < run["host_ms"] <= run["step_ms"] * 1.001 and run["n_layers"] == 2
        assert "function calls" in run["profile"] and "tottime" in run["profile"]


def test_graph_meshes_asks_for_a_graph_where_a_mesh_can_capture_one(tmp_path: Path):
    """--graph-meshes (bench/mesh_sweep.sh's non-skeleton sets): train.cuda_graph=on at the multi-GPU layouts
    without expert parallelism, and the planner's prediction for each job as it will run (a graph there)."""
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src")}

    def planned(*extra: str) -> dict[str, float]:
        proc = subprocess.run([sys.executable, str(ROOT / "bench" / "mesh_runs.py"), "--plan-only", "--gpus", "2",
                               "--layouts", "2,1,1;1,2,1;1,1,2", "--configs", "gpu-preset", *extra],
                              env=env, capture_output=True, text=True, timeout=120)
        assert proc.returncode == 0, proc.stderr[-2000:]
        return {line.split()[0]: float(line.split("predicted ")[1].split(" ms")[0])
                for line in proc.stdout.splitlines() if " predicted " in line}

    eager, graphs = planned(), planned("--graph-meshes")
    assert set(eager) == set(graphs) == {"gpu-preset/1x1x1", "gpu-preset/2x1x1", "gpu-preset/1x2x1", "gpu-preset/1x1x2"}
    assert graphs["gpu-preset/1x2x1"] == eager["gpu-preset/1x2x1"]  # expert parallelism: op by op either way
    assert graphs["gpu-preset/1x1x1"] == eager["gpu-preset/1x1x1"]  # one GPU: a graph either way
    for layout in ("2x1x1", "1x1x2"):  # no host term: faster
        assert graphs[f"gpu-preset/{layout}"] < 0.8 * eager[f"gpu-preset/{layout}"]
