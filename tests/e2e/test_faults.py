"""Issue 6 section 3, through the real CLI as a user (or a scheduler) meets it: SIGTERM / Ctrl-C, a rank
killed with SIGKILL, a programmer error on one rank, a frozen rank (the watchdog), and a restart.

Every run is a subprocess in its own session, with TMPDIR pointing at a private empty directory: after
it, that directory must be empty again (no torch error files or log dirs) and no process of the session
may be left. Worker ranks are found as children of the moemesh process; the local launcher forks them
in rank order, so sorted by pid they are ranks 0, 1, ... gloo on CPU (also on a GPU machine), tiny model.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

import moemesh
from moemesh.train.ckpt_paths import latest_checkpoint, step_of
from tests.e2e.test_distributed_cli import QUIET, _children, _no_moemesh_traceback, _records, _sets

MOEMESH = [sys.executable, "-m", "moemesh", "train"]


@dataclass
class Ended:
    code: int
    out: str
    err: str
    leftovers: list[int]  # processes of the run's session still alive after the moemesh process ended

    def __str__(self) -> str:
        return f"exit {self.code}\nstdout:\n{self.out}\nstderr:\n{self.err}"


class Run:
    """`moemesh train` in its own session, with stdout/stderr in files and a private TMPDIR."""

    def __init__(self, tmp_path: Path, name: str, args: list[str], driver: list[str] = MOEMESH):
        self.cwd = tmp_path / name
        self.tmp = tmp_path / f"{name}-tmp"
        self.cwd.mkdir()
        self.tmp.mkdir()
        self.run_dir = self.cwd / "run"
        self.out = open(tmp_path / f"{name}.out", "w+")
        self.err = open(tmp_path / f"{name}.err", "w+")
        # The moemesh under test, also when this process found it through a relative PYTHONPATH
        source = str(Path(moemesh.__file__).parents[1])
        env = {**os.environ, "TMPDIR": str(self.tmp),
               "PYTHONPATH": os.pathsep.join([source, *filter(None, [os.environ.get("PYTHONPATH")])])}
        sets = _sets(f"run.dir={self.run_dir}", "train.device=cpu", *QUIET)
        self.proc = subprocess.Popen([*driver, *sets, *args], cwd=self.cwd, stdout=self.out, stderr=self.err,
                                     text=True, env=env, start_new_session=True)
        self.started = time.monotonic()

    def workers(self) -> list[int]:
        return sorted(_children({self.proc.pid}))

    def wait_for_step(self, step: int, timeout: float = 120) -> int:
        """Block until metrics.jsonl holds `step` (or later); return the last logged step."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            assert self.proc.poll() is None, f"the run ended before step {step}:\n{self.end()}"
            path = self.run_dir / "metrics.jsonl"
            lines = path.read_text().splitlines() if path.exists() else []
            if lines and lines[-1].endswith("}") and json.loads(lines[-1])["step"] >= step:
                return json.loads(lines[-1])["step"]
            time.sleep(0.05)
        raise AssertionError(f"step {step} not reached in {timeout} s")

    def end(self, timeout: float = 120) -> Ended:
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            pass
        leftovers = _session_members(self.proc.pid)
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)  # whatever is left, so that no test leaks processes
        except ProcessLookupError:
            pass
        self.proc.wait()
        self.out.seek(0)
        self.err.seek(0)
        return Ended(self.proc.returncode, self.out.read(), self.err.read(), leftovers)

    def tmp_entries(self) -> list[str]:
        """What the run left in its TMPDIR, but torch's per-user compile cache (torchinductor_USER), which
        training creates on first use and every later run reuses by design."""
        return sorted(name for name in os.listdir(self.tmp) if not name.startswith("torchinductor_"))


def _session_members(sid: int) -> list[int]:
    members = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[3]) == sid and fields[0] != "Z":  # field 6 of stat: the session id
            members.append(int(stat.parent.name))
    return members


def _moemesh_lines(err: str) -> list[str]:
    return [line for line in err.splitlines() if line.startswith("moemesh:")]


def _checkpoint_clause(run_dir: Path, step: int) -> str:
    """What the message must say about checkpoints: the stop step's checkpoint once train/checkpoint.py
    writes them, and until then that none was written."""
    found = latest_checkpoint(run_dir)
    if found is None:
        return "no checkpoint was written"
    assert step_of(found) == step, f"the newest checkpoint {found} is not the stop step {step}"
    return f"checkpoint: {found} (run the same command to continue)"


# --- 1. signals: finish the step, stop at the same step on every rank, exit 128 + signum ---------------

@pytest.mark.parametrize("world, signum, to_group", [
    (1, signal.SIGTERM, False),  # the scheduler's stop, single process
    (1, signal.SIGINT, True),  # Ctrl-C, single process
    (2, signal.SIGTERM, False),  # `kill PID` of the moemesh process: its launcher forwards it
    (2, signal.SIGINT, True),  # Ctrl-C in a terminal: the launcher and every rank get it (and ranks again)
], ids=["1-sigterm", "1-ctrl-c", "2-sigterm", "2-ctrl-c"])
def test_signal_finishes_the_step_and_exits_128_plus_signum(tmp_path: Path, world, signum, to_group):
    run = Run(tmp_path, "run", _sets(f"parallel.dp={world}", "train.steps=1000", "run.log_every=1"))
    run.wait_for_step(3)
    (os.killpg if to_group else os.kill)(run.proc.pid, signum)
    sent = time.monotonic()
    ended = run.end()
    assert ended.code == 128 + signum, ended
    assert time.monotonic() - sent < 20, "the stop took longer than a step and a checkpoint"
    assert not ended.leftovers and run.tmp_entries() == [], (ended.leftovers, run.tmp_entries())
    lines = ended.err.splitlines()
    assert len(lines) <= 3 and len(_moemesh_lines(ended.err)) == 1, ended
    name = signal.Signals(signum).name
    match = re.fullmatch(rf"moemesh: interrupted by {name} after step (\d+); (.*)", _moemesh_lines(ended.err)[0])
    assert match, ended
    step = int(match.group(1))
    assert step >= 3 and _records(run.run_dir)[-1]["step"] == step, "every rank stopped after the logged step"
    assert match.group(2) == _checkpoint_clause(run.run_dir, step), ended
    assert ended.out == "" and not (run.run_dir / "summary.json").exists(), ended
    if signum == signal.SIGINT:  # `moemesh train` again continues from that checkpoint
        again = Run(tmp_path, "again", _sets(f"parallel.dp={world}", f"train.steps={step + 2}", "run.log_every=1",
                                             f"run.dir={run.run_dir}"))
        resumed = again.end()
        assert resumed.code == 0, resumed
        assert json.loads((run.run_dir / "summary.json").read_text())["resumed_from_step"] == step
        assert [r["step"] for r in _records(run.run_dir)] == list(range(1, step + 3))


# --- 2. a rank dies or fails: one line from the launcher, exit 1, nothing left --------------------------

def test_killed_rank_is_named_once_and_nothing_is_left(tmp_path: Path):
    run = Run(tmp_path, "run", _sets("parallel.dp=4", "train.steps=1000", "run.log_every=1"))
    run.wait_for_step(3)
    workers = run.workers()
    assert len(workers) == 4, workers
    os.kill(workers[2], signal.SIGKILL)
    killed = time.monotonic()
    ended = run.end()
    assert ended.code == 1, ended
    assert time.monotonic() - killed < 10, "the launcher was slow to stop the other ranks"
    assert not ended.leftovers and run.tmp_entries() == [], (ended.leftovers, run.tmp_entries())
    lines = ended.err.splitlines()
    assert len(lines) == 1, ended  # the survivors' "Connection reset by peer" stays out of sight
    assert re.fullmatch(r"moemesh: rank 2 was killed by SIGKILL during step \d+; no checkpoint was written"
                        r"|moemesh: rank 2 was killed by SIGKILL during step \d+; checkpoint: .*step_\d+ \(run the "
                        r"same command to continue\)", lines[0]), ended
    assert not (run.run_dir / "logs").exists(), "a lost peer is not a programmer error: no traceback kept"


# One rank raises in step 3; the others then lose it in their next collective.
PLANTED_ERROR = """
import os, sys
from moemesh.cli import main
from moemesh.train.loop import Trainer
original = Trainer.step
def step(self, n):
    if n == 3 and os.environ.get("RANK") == "1":
        raise ValueError("planted failure on one rank")
    return original(self, n)
Trainer.step = step
sys.exit(main(["train", *sys.argv[1:]]))
"""


@pytest.mark.parametrize("debug", [False, True], ids=["quiet", "debug"])
def test_programmer_error_names_the_rank_and_its_traceback_file(tmp_path: Path, debug):
    run = Run(tmp_path, "run", _sets("parallel.dp=2", "train.steps=6", f"run.debug={str(debug).lower()}"),
              driver=[sys.executable, "-c", PLANTED_ERROR])
    ended = run.end()
    assert ended.code == 1, ended
    assert not ended.leftovers and run.tmp_entries() == [], (ended.leftovers, run.tmp_entries())
    log = run.run_dir / "logs" / "rank1.txt"
    assert _moemesh_lines(ended.err) == [f"moemesh: rank 1 failed during step 3: ValueError: planted failure on one rank "
                                         f"(traceback: {log}); no checkpoint was written"], ended
    assert "Traceback" in log.read_text() and "planted failure" in log.read_text()
    assert not (run.run_dir / "logs" / "rank0.txt").exists(), "rank 0 only lost its peer"
    if debug:  # the failed rank's traceback, and rank 0's lost connection, on stderr too
        assert "ValueError: planted failure" in ended.err and "Connection" in ended.err, ended
    else:
        assert len(ended.err.splitlines()) == 1, ended


# --- 3. restart: a killed rank restarts the group, which resumes from the last checkpoint ---------------

RESTART = ["parallel.dp=2", "train.steps=12", "run.checkpoint_every=4", "run.log_every=1"]


def test_restart_after_a_killed_rank_resumes_and_matches_an_undisturbed_run(tmp_path: Path):
    """Needs train/checkpoint.py (checkpoints + resume): until then no checkpoint appears by step 6."""
    ref = Run(tmp_path, "ref", _sets(*RESTART))
    ref_ended = ref.end()
    assert ref_ended.code == 0, ref_ended

    run = Run(tmp_path, "run", _sets(*RESTART, "run.max_restarts=1"))
    run.wait_for_step(6)
    workers = run.workers()
    for pid in workers:  # a step takes ~40 ms here: hold the ranks, so that the kill lands mid-run
        os.kill(pid, signal.SIGSTOP)
    checkpoint = latest_checkpoint(run.run_dir)
    os.kill(workers[1], signal.SIGKILL)
    os.kill(workers[0], signal.SIGCONT)
    ended = run.end()
    assert checkpoint is not None and step_of(checkpoint) >= 4, (
        f"no complete checkpoint by step 6 with run.checkpoint_every=4 (waits for train/checkpoint.py)\n{ended}")
    assert ended.code == 0, ended
    assert not ended.leftovers and run.tmp_entries() == [], (ended.leftovers, run.tmp_entries())
    _no_moemesh_traceback(ended.err)
    lines = _moemesh_lines(ended.err)
    assert len(lines) == 1 and re.fullmatch(r"moemesh: rank 1 died; restart 1 of 1, resuming from step_0000(04|08)",
                                            lines[0]), ended
    records, ref_records = _records(run.run_dir), _records(ref.run_dir)
    assert [r["step"] for r in records] == list(range(1, 13)), "each step logged once, in order"
    for got, want in zip(records[-4:], ref_records[-4:]):  # after the resume: same losses, exactly
        for key in ("loss", "lm_loss", "aux_loss", "z_loss", "grad_norm"):
            assert got[key] == pytest.approx(want[key], rel=1e-6), (got["step"], key)
    summary, ref_summary = (json.loads((d / "summary.json").read_text()) for d in (run.run_dir, ref.run_dir))
    assert summary["final_lm_loss"] == pytest.approx(ref_summary["final_lm_loss"], rel=1e-6)


# --- 4. the watchdog, through the CLI: a frozen rank; exit 3 within seconds of parallel.timeout_s --------

def test_frozen_rank_watchdog_exit_3_within_seconds(tmp_path: Path):
    timeout_s = 3
    run = Run(tmp_path, "run", _sets("parallel.dp=2", "train.steps=1000", "run.log_every=1",
                                     f"parallel.timeout_s={timeout_s}"))
    run.wait_for_step(3)
    workers = run.workers()
    os.kill(workers[1], signal.SIGSTOP)  # frozen: it neither computes, nor posts, nor reacts to SIGTERM
    frozen = time.monotonic()
    ended = run.end()
    elapsed = time.monotonic() - frozen
    assert ended.code == 3, ended
    # timeout, up to 1 s of watchdog polling, then the launcher's 3 s grace for the frozen rank
    assert elapsed < timeout_s + 6, f"exit 3 came {elapsed:.1f} s after the rank froze"
    assert not ended.leftovers and run.tmp_entries() == [], (ended.leftovers, run.tmp_entries())
    lines = ended.err.splitlines()
    assert len(lines) == 1, ended
    assert re.fullmatch(rf"moemesh: error: rank 0 waited {timeout_s} s in collective #\d+ step \d+ .*: \w+ on "
                        r"\w+ group \[0, 1\] shape \[.*\]; rank 1 never joined \(last seen \d+ s ago: .*\)",
                        lines[0]), ended
