"""The run dir through the real CLI, as a user meets it: an earlier run is refused unless run.overwrite
is set, a run dir in use by another run is refused at once, and config.toml repeats the run from any
directory. Each run trains 2-3 steps (~3 s on 2 cores, mostly `import torch`)."""

from __future__ import annotations

import fcntl
import json
import shutil
import os
import subprocess
import sys
import time
import tomllib
from pathlib import Path

FIXTURE = Path(__file__).resolve().parents[1] / "fixtures" / "tinyshakespeare_150k.txt"
CHEAP = ["--set", "train.steps=2", "--set", "run.progress=false", "--set", "run.tensorboard=false"]
OUTPUTS = ("config.toml", "metrics.jsonl", "summary.json")


def _moemesh(cwd: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "moemesh", "train", *CHEAP, *args], cwd=cwd,
                          capture_output=True, text=True, timeout=300)


def _ok(proc: subprocess.CompletedProcess) -> None:
    assert proc.returncode == 0, f"exit {proc.returncode}\nstdout:\n{proc.stdout}\nstderr:\n{proc.stderr}"


def _one_error_line(proc: subprocess.CompletedProcess) -> str:
    assert proc.returncode == 2, f"exit {proc.returncode}\nstdout:\n{proc.stdout}\nstderr:\n{proc.stderr}"
    assert "Traceback" not in proc.stderr and proc.stdout == ""
    lines = proc.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("moemesh: error: "), proc.stderr
    return lines[0]


def _steps(run_dir: Path) -> list[int]:
    return [json.loads(line)["step"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_earlier_run_is_refused_and_replaced_only_with_overwrite(tmp_path: Path):
    _ok(_moemesh(tmp_path, "--set", "run.dir=run"))
    run_dir = tmp_path / "run"
    shutil.rmtree(run_dir / "checkpoints")  # as if the run had died before its first checkpoint
    (run_dir / "notes.txt").write_text("mine")
    before = {name: (run_dir / name).read_bytes() for name in OUTPUTS}

    line = _one_error_line(_moemesh(tmp_path, "--set", "run.dir=run", "--set", "train.resume=none",
                                    "--set", "train.steps=3"))
    assert "run.dir=run holds an earlier run (metrics.jsonl, summary.json)" in line
    assert "run.overwrite=true" in line and "another run.dir" in line
    assert {name: (run_dir / name).read_bytes() for name in OUTPUTS} == before

    checkpoint = run_dir / "checkpoints" / "step_000002"  # complete: it has its manifest
    checkpoint.mkdir(parents=True)
    (checkpoint / "manifest.json").write_text('{"step": 2, "files": {}}')
    line = _one_error_line(_moemesh(tmp_path, "--set", "run.dir=run", "--set", "train.resume=none"))
    assert "(metrics.jsonl, summary.json, checkpoints/) and train.resume=none; set train.resume=auto" in line

    _ok(_moemesh(tmp_path, "--set", "run.dir=run", "--set", "run.overwrite=true", "--set", "train.steps=3"))
    assert _steps(run_dir) == [3]  # a fresh metrics.jsonl, not the old one with a record appended
    assert json.loads((run_dir / "summary.json").read_text())["steps"] == 3
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == ["step_000003"]  # the old ones went
    assert (run_dir / "notes.txt").read_text() == "mine"  # only the run's own outputs are replaced


def test_run_dir_in_use_is_refused_at_once_naming_the_holder(tmp_path: Path):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    with open(run_dir / ".lock", "w") as lock:  # this test process plays the first, still running, run
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        lock.write(f"{os.getpid()}\n")
        lock.flush()
        start = time.monotonic()
        line = _one_error_line(_moemesh(tmp_path, "--set", "run.dir=run"))
        waited = time.monotonic() - start
    assert f"run.dir=run is in use by another moemesh run (pid {os.getpid()})" in line
    assert waited < 60, f"the second run waited {waited:.0f} s for the lock"  # refused, never queued
    assert sorted(p.name for p in run_dir.iterdir()) == [".lock"]

    _ok(_moemesh(tmp_path, "--set", "run.dir=run"))  # the OS dropped the lock with the file's close
    assert (run_dir / ".lock").read_text().strip().isdigit()


def test_config_toml_repeats_the_run_from_another_directory(tmp_path: Path):
    (tmp_path / "corpus.txt").write_bytes(FIXTURE.read_bytes()[:20_000])
    _ok(_moemesh(tmp_path, "shakespeare", "--set", "data.path=corpus.txt", "--set", "run.dir=runs/first"))
    saved = tomllib.loads((tmp_path / "runs/first/config.toml").read_text())
    assert saved["data"]["path"] == str((tmp_path / "corpus.txt").resolve())
    assert saved["run"]["dir"] == "runs/first"  # as the user gave it

    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    _ok(_moemesh(elsewhere, str(tmp_path / "runs/first/config.toml"), "--set", "run.dir=again"))
    first, again = (json.loads(p.read_text()) for p in (tmp_path / "runs/first/metrics.jsonl",
                                                          elsewhere / "again/metrics.jsonl"))
    assert first["lm_loss"] == again["lm_loss"]  # same data, same seed: the same run
