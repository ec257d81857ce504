"""Issue 3 through the real CLI, as a user runs it: the local 8-process mesh (`make demo`), torchrun with
one and two "nodes", the collective watchdog, and the layout errors caught before any process group.

Every run is a subprocess with its cwd and run dir in tmp_path. gloo on CPU, fp32. Launch cost dominates
on 2 cores (ENV_NOTES.md): each test launches once, with few steps.
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest
import torch

import moemesh
from moemesh.config import ParallelConfig
from moemesh.launch import init_mesh, launch_local

TORCHRUN = str(Path(sys.executable).parent / "torchrun")
QUIET = ["run.progress=false", "run.tensorboard=false"]
# fp32 on CPU: sharded matmuls and reductions sum in another order (~1e-7), 30 AdamW steps amplify it mildly
TOL = 1e-5
LOSS_KEYS = ("loss", "lm_loss", "aux_loss", "z_loss", "grad_norm")


def _sets(*items: str) -> list[str]:
    return [arg for item in items for arg in ("--set", item)]


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _tree(root: Path) -> dict[str, int | None]:
    return {str(p.relative_to(root)): None if p.is_dir() else p.stat().st_size for p in sorted(root.rglob("*"))}


def _children(pids: set[int]) -> set[int]:
    """Direct child processes of pids, from /proc."""
    kids = set()
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) in pids:
            kids.add(int(stat.parent.name))
    return kids


def _run(cmds: list[list[str]], cwd: Path, timeout: float = 300) -> tuple[list[subprocess.CompletedProcess], int]:
    """Run the commands concurrently in cwd, each in its own session; return their results and how many
    distinct child processes they started (sampled every 50 ms). On timeout, or if the test fails,
    every process of their sessions is killed: no orphaned ranks. Output goes to files beside cwd."""
    logs = [(open(cwd.parent / f"{cwd.name}.{i}.out", "w+"), open(cwd.parent / f"{cwd.name}.{i}.err", "w+"))
            for i in range(len(cmds))]
    procs = [subprocess.Popen(cmd, cwd=cwd, stdout=out, stderr=err, text=True, start_new_session=True)
             for cmd, (out, err) in zip(cmds, logs)]
    seen: set[int] = set()
    deadline = time.monotonic() + timeout
    try:
        while any(p.poll() is None for p in procs) and time.monotonic() < deadline:
            seen |= _children({p.pid for p in procs})
            time.sleep(0.05)
    finally:
        for proc in procs:
            try:
                os.killpg(proc.pid, signal.SIGKILL)  # the leader has exited or timed out: ends leftovers
            except ProcessLookupError:
                pass
            proc.wait()
    results = []
    for cmd, proc, (out, err) in zip(cmds, procs, logs):
        out.seek(0)
        err.seek(0)
        results.append(subprocess.CompletedProcess(cmd, proc.returncode, out.read(), err.read()))
        out.close()
        err.close()
    return results, len(seen)


def _run1(cmd: list[str], cwd: Path, timeout: float = 300) -> subprocess.CompletedProcess:
    return _run([cmd], cwd, timeout)[0][0]


def _records(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def _rel(a: float, b: float) -> float:
    return abs(a - b) / max(abs(b), 1e-30)


def _ok(proc: subprocess.CompletedProcess) -> str:
    return f"exit {proc.returncode}\nstdout:\n{proc.stdout}\nstderr:\n{proc.stderr}"


def _no_moemesh_traceback(text: str) -> None:
    package = str(Path(moemesh.__file__).parent)
    frames = [line for line in text.splitlines() if line.lstrip().startswith('File "') and package in line]
    assert not frames, "traceback through moemesh code:\n" + text


@pytest.fixture
def cwd(tmp_path: Path) -> Path:
    """The working directory of the CLI; logs of `_run` go beside it, in tmp_path."""
    (tmp_path / "cwd").mkdir()
    return tmp_path / "cwd"


# --- 1. `make demo`: 8 local processes, progress bar, summary, parity with the single-process run -------

def test_demo_8_processes_progress_summary_and_parity_with_single_process(cwd: Path):
    steps = 30
    demo_dir, ref_dir = cwd / "demo", cwd / "ref"
    (demo,), num_children = _run([[sys.executable, "-m", "moemesh", "train", *_sets(
        "parallel.dp=2", "parallel.ep=2", "parallel.tp=2", f"train.steps={steps}", f"run.dir={demo_dir}")]], cwd)
    assert demo.returncode == 0, _ok(demo)
    assert num_children == 8, f"expected 8 worker processes, saw {num_children} children"
    assert "Traceback" not in demo.stderr and "terminate called" not in demo.stderr, demo.stderr
    # tqdm on stderr, rank 0 only: "100%|##########| 30/30 [00:05<00:00, 5.1step/s, loss=...]" ("s/step" if slow)
    assert re.search(rf"100%\|.*\| {steps}/{steps} \[.*(step/s|s/step)", demo.stderr), demo.stderr
    assert demo.stderr.count(f"| {steps}/{steps} [") <= 2, "one progress bar (tqdm redraws the last line on close)"
    assert demo.stdout.count(f"moemesh: {steps} steps") == 1, demo.stdout
    assert demo.stdout.count("entropy floor") == 1, demo.stdout

    assert list(cwd.rglob("metrics.jsonl")) == [demo_dir / "metrics.jsonl"]
    records = _records(demo_dir)
    assert [r["step"] for r in records] == [10, 20, 30], "one line per logged step, from rank 0 only"
    assert json.loads((demo_dir / "summary.json").read_text())["layout"] == {"dp": 2, "ep": 2, "tp": 2}

    ref = _run1([sys.executable, "-m", "moemesh", "train", *_sets(f"train.steps={steps}", f"run.dir={ref_dir}",
                                                                  *QUIET)], cwd)
    assert ref.returncode == 0, _ok(ref)
    ref_records = _records(ref_dir)
    assert [r["step"] for r in ref_records] == [r["step"] for r in records]
    for got, want in zip(records, ref_records):
        for key in LOSS_KEYS:
            assert _rel(got[key], want[key]) <= TOL, (got["step"], key, got[key], want[key])


# --- 2. torchrun on one node: the given world, or a one-line refusal ------------------------------------

def test_torchrun_2_processes_dp2(cwd: Path):
    run_dir = cwd / "run"
    proc = _run1([TORCHRUN, "--nproc-per-node", "2", "-m", "moemesh", "train",
                  *_sets("parallel.dp=2", "train.steps=4", "run.log_every=1", f"run.dir={run_dir}", *QUIET)], cwd)
    assert proc.returncode == 0, _ok(proc)
    _no_moemesh_traceback(proc.stderr)
    assert proc.stdout.count("moemesh: 4 steps") == 1, proc.stdout
    assert [r["step"] for r in _records(run_dir)] == [1, 2, 3, 4]
    assert list(cwd.rglob("metrics.jsonl")) == [run_dir / "metrics.jsonl"]


@pytest.mark.parametrize("layout, expected", [
    (["parallel.dp=2", "parallel.tp=2"], "torchrun started 2 processes but parallel.dp*ep*tp = 2*1*2 = 4"),
    ([], "torchrun started 2 processes but parallel.dp*ep*tp = 1*1*1 = 1"),
    # world size right, layout wrong: a config error, before torch is even imported
    (["parallel.tp=2", "model.vocab_size=127"], "model.vocab_size=127 is not divisible by parallel.tp=2"),
], ids=["world-4", "world-1", "config-error"])
def test_torchrun_refuses_before_any_process_group(cwd: Path, layout, expected):
    # run.dir stays the preset's relative runs/tiny: a run dir created by mistake would appear in cwd
    proc = _run1([TORCHRUN, "--nproc-per-node", "2", "-m", "moemesh", "train",
                  *_sets(*layout, "train.steps=2", *QUIET)], cwd)
    assert proc.returncode != 0, _ok(proc)  # the torchrun agent's own code for "a worker failed"
    ours = [line for line in proc.stderr.splitlines() if line.startswith("moemesh:")]
    # one line from each rank that got that far: torchrun stops the other rank as soon as one has failed,
    # which on a loaded machine can be before its interpreter has started
    assert 1 <= len(ours) <= 2, proc.stderr
    assert all(line.startswith(f"moemesh: error: {expected}") for line in ours), proc.stderr
    assert "exitcode  : 2" in proc.stderr, proc.stderr  # the agent's report of the ranks' exit code
    _no_moemesh_traceback(proc.stderr)
    assert proc.stdout == ""
    assert _tree(cwd) == {}, "the refused run left files behind"


# --- 3. two torchrun launchers as two "nodes" through a c10d rendezvous on 127.0.0.1 --------------------

def test_torchrun_two_nodes_c10d_rendezvous(cwd: Path):
    run_dir = cwd / "run"
    cmd = [TORCHRUN, "--nnodes", "2", "--nproc-per-node", "2", "--rdzv-backend", "c10d",
           "--rdzv-endpoint", f"127.0.0.1:{_free_port()}", "--rdzv-id", uuid.uuid4().hex,
           "-m", "moemesh", "train",
           *_sets("parallel.dp=2", "parallel.tp=2", "train.steps=4", "run.log_every=1", f"run.dir={run_dir}", *QUIET)]
    nodes, _ = _run([cmd, cmd], cwd)
    for node in nodes:
        assert node.returncode == 0, _ok(node)
        _no_moemesh_traceback(node.stderr)
    stdout = "".join(node.stdout for node in nodes)
    assert stdout.count("moemesh: 4 steps") == 1, stdout  # global rank 0 only
    assert list(cwd.rglob("metrics.jsonl")) == [run_dir / "metrics.jsonl"]
    assert [r["step"] for r in _records(run_dir)] == [1, 2, 3, 4]
    assert json.loads((run_dir / "summary.json").read_text())["layout"] == {"dp": 2, "ep": 1, "tp": 2}


# --- 4. the watchdog: a collective that never completes says where it waits -----------------------------

WATCHDOG_S = 3


def _rank_skips_collective(sleep_s: float) -> int:
    """Rank 0 issues an all-reduce on its expert group; rank 1 never joins it. The mesh comes from
    `init_mesh`, as in training: its process-group timeout must leave the watchdog time to speak first."""
    mesh = init_mesh(ParallelConfig(dp=1, ep=2, tp=1, timeout_s=WATCHDOG_S), "cpu")
    if mesh.rank == 0:
        mesh.trace.step, mesh.trace.layer = 7, "layer 1"
        mesh.comm("expert").all_reduce(torch.ones(4))
        print("moemesh-test: the all-reduce returned", file=sys.stderr, flush=True)
    else:
        time.sleep(sleep_s)  # bounded, should the launcher fail to end this rank
    return 0


def test_watchdog_reports_where_a_rank_waits(capfd):
    sleep_s = 60
    start = time.monotonic()
    failed = launch_local(_rank_skips_collective, (sleep_s,), 2)
    elapsed = time.monotonic() - start
    err = capfd.readouterr().err
    assert failed is not None and failed.exit_code == 3 and failed.message is None, (failed, err)
    line = next((l for l in err.splitlines() if l.startswith("moemesh: error: rank 0 waited")), None)
    assert line is not None, err
    # the collective, then the peer that never joined it and where it was (rank 1 never set a step)
    assert line == (f"moemesh: error: rank 0 waited {WATCHDOG_S} s in collective #1 step 7 layer 1: "
                    "all_reduce on expert group [0, 1] shape [4]; "
                    "rank 1 never joined (last seen: step 0, not in a collective)"), line
    assert "returned" not in err and "moemesh: error: rank 1" not in err, err
    # the launcher ended the sleeping rank as soon as rank 0 failed, instead of waiting out its sleep
    assert elapsed < sleep_s / 2, f"launch took {elapsed:.1f} s: the sleeping rank was not terminated"


# --- 5. layout errors: before any process group, through the CLI --------------------------------------

LAYOUT_CASES = [
    pytest.param(["parallel.ep=3"], ["model.num_experts=4", "parallel.ep=3"], id="experts-not-divisible-by-ep"),
    pytest.param(["parallel.tp=3"], ["model.n_heads=4", "parallel.tp=3"], id="heads-not-divisible-by-tp"),
    pytest.param(["parallel.tp=4"], ["model.n_kv_heads=2", "parallel.tp=4"], id="kv-heads-not-divisible-by-tp"),
    pytest.param(["parallel.tp=2", "model.ffn_dim=127"], ["model.ffn_dim=127", "parallel.tp=2"],
                 id="ffn-dim-not-divisible-by-tp"),
    pytest.param(["parallel.tp=2", "model.dense_ffn_dim=255"], ["model.dense_ffn_dim=255", "parallel.tp=2"],
                 id="dense-ffn-dim-not-divisible-by-tp"),
    pytest.param(["parallel.tp=2", "model.vocab_size=127"], ["model.vocab_size=127", "parallel.tp=2", "pad it to 128"],
                 id="vocab-not-divisible-by-tp"),
    pytest.param(["parallel.tp=4", "model.n_kv_heads=4", "model.vocab_size=130"],
                 ["model.vocab_size=130", "parallel.tp=4", "pad it to 132"], id="vocab-pad-to-multiple"),
    pytest.param(["parallel.dp=3"], ["train.global_batch=16", "parallel.dp*parallel.ep=3"],
                 id="batch-not-divisible-by-dp"),
    pytest.param(["parallel.dp=2", "parallel.ep=2", "train.global_batch=6"],
                 ["train.global_batch=6", "parallel.dp*parallel.ep=4"], id="batch-not-divisible-by-dp-ep"),
    pytest.param(["parallel.dp=0"], ["parallel.dp=0", "> 0"], id="dp-zero"),
    pytest.param(["parallel.ep=0"], ["parallel.ep=0", "> 0"], id="ep-zero"),
    pytest.param(["parallel.tp=-2"], ["parallel.tp=-2", "> 0"], id="tp-negative"),
    pytest.param(["parallel.timeout_s=0"], ["parallel.timeout_s=0", "> 0"], id="timeout-zero"),
    pytest.param(["parallel.tp=2", "parallel.sequence_parallel=true", "train.seq_len=63"],
                 ["train.seq_len=63", "parallel.tp=2", "sequence_parallel"], id="seq-len-not-divisible-with-sp"),
]


@pytest.mark.parametrize("layout, expected", LAYOUT_CASES)
def test_bad_layout_one_line_exit_2_nothing_written(cwd: Path, layout, expected):
    # run.dir stays the preset's relative runs/tiny: a run dir created by mistake would appear in cwd.
    # Cheap overrides first, so that a case that wrongly passes trains 2 steps, not 200.
    proc = _run1([sys.executable, "-m", "moemesh", "train", *_sets("train.steps=2", *QUIET, *layout)], cwd)
    lines = proc.stderr.splitlines()
    assert proc.returncode == 2, _ok(proc)
    assert "Traceback" not in proc.stderr + proc.stdout
    assert len(lines) == 1 and lines[0].startswith("moemesh: error: "), proc.stderr
    for text in expected:
        assert text in lines[0], f"{text!r} missing from: {lines[0]}"
    assert proc.stdout == ""
    assert _tree(cwd) == {}, "the failed run left files behind"


def test_sequence_parallel_seq_len_rule_only_applies_with_sp():
    """The seq_len % tp rule is sequence parallel's: without it, seq_len=63 at tp=2 is a valid layout."""
    from moemesh.config import load_config

    assert load_config("tiny", ["parallel.tp=2", "train.seq_len=63"]).parallel.tp == 2
