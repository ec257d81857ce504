"""`moemesh train` end to end, in a subprocess, as a user runs it: outputs of a run, and how well it learns.

The figures (loss vs. floor, shakespeare loss) are printed; `pytest -s tests/e2e/test_train.py` shows them.
"""

from __future__ import annotations

import json
import re
import resource
import signal
import subprocess
import sys
from pathlib import Path

import pytest

import moemesh
from moemesh.config import load_config, preset_names
from moemesh.train.data import unigram_entropy

# The first 150 KB of tinyshakespeare (public domain), shipped so that the test runs in a fresh clone
SHAKESPEARE = Path(__file__).resolve().parents[1] / "fixtures" / "tinyshakespeare_150k.txt"
REQUIRED_KEYS = {"step", "loss", "lm_loss", "aux_loss", "z_loss", "lr", "grad_norm", "tokens_per_s",
                 "expert_load", "dropped_frac"}


def _train(cwd: Path, *args: str, timeout: int = 600) -> subprocess.CompletedProcess:
    proc = subprocess.run([sys.executable, "-m", "moemesh", "train", *args], cwd=cwd, capture_output=True,
                          text=True, timeout=timeout)
    assert proc.returncode == 0, f"exit {proc.returncode}\nstdout:\n{proc.stdout}\nstderr:\n{proc.stderr}"
    return proc


def test_default_tiny_run_outputs_and_gap_to_entropy_floor(tmp_path: Path):
    run_dir = tmp_path / "run"
    overrides = [f"run.dir={run_dir}", "run.progress=false"]
    proc = _train(tmp_path, *(arg for item in overrides for arg in ("--set", item)))
    cfg = load_config("tiny", overrides)

    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    steps = list(range(cfg.run.log_every, cfg.train.steps + 1, cfg.run.log_every))
    assert [r["step"] for r in records] == steps
    num_moe_layers = cfg.model.n_layers - cfg.model.num_dense_layers
    for record in records:
        assert REQUIRED_KEYS <= record.keys(), REQUIRED_KEYS - record.keys()
        assert len(record["expert_load"]) == num_moe_layers == len(record["dropped_frac"])
        for load in record["expert_load"]:
            assert len(load) == cfg.model.num_experts
            assert sum(load) == pytest.approx(1.0, abs=1e-5)  # fractions of all assignments of the layer
        assert record["dropped_frac"] == [0.0] * num_moe_layers  # dropless by default
        assert record["tokens_per_s"] > 0 and record["grad_norm"] > 0 and record["lr"] > 0
    assert records[-1]["lm_loss"] < records[0]["lm_loss"]

    assert load_config(str(run_dir / "config.toml")) == cfg  # config.toml reproduces the run
    assert list((run_dir / "tensorboard").glob("events.out.tfevents.*"))
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["steps"] == cfg.train.steps and summary["entropy_floor"] > 0
    print(f"\ntiny synthetic: final lm loss {summary['final_lm_loss']:.4f}, entropy floor "
          f"{summary['entropy_floor']:.4f}, gap {100 * summary['gap_to_floor']:.1f}%, "
          f"{summary['tokens_per_s']:.0f} tokens/s")
    assert "entropy floor" in proc.stdout
    assert summary["gap_to_floor"] < 0.10


def test_shakespeare_beats_unigram_entropy_by_half_a_nat(tmp_path: Path):
    run_dir = tmp_path / "run"
    _train(tmp_path, "shakespeare", "--set", f"data.path={SHAKESPEARE}", "--set", f"run.dir={run_dir}",
           "--set", "run.progress=false", "--set", "run.tensorboard=false")
    summary = json.loads((run_dir / "summary.json").read_text())
    unigram = unigram_entropy(SHAKESPEARE)  # 3.29 nats/byte for the fixture (3.31 for all of tinyshakespeare)
    print(f"\ntinyshakespeare fixture: final lm loss {summary['final_lm_loss']:.4f} nats/byte, unigram entropy "
          f"{unigram:.4f}, {summary['steps']} steps in {summary['elapsed_s']:.1f} s")
    assert summary["entropy_floor"] is None
    assert unigram > 3.0  # English text; a fixture replaced by something else would not be
    assert summary["final_lm_loss"] < unigram - 0.5


def test_full_disk_stops_the_run_with_one_line_and_whole_records(tmp_path: Path):
    """RLIMIT_FSIZE (with SIGXFSZ ignored, so writes fail with EFBIG) plays a disk that fills up mid-run."""
    def small_disk():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (3000, resource.RLIM_INFINITY))

    proc = subprocess.run([sys.executable, "-m", "moemesh", "train", "--set", "train.steps=20", "--set",
                           "run.log_every=1", "--set", "run.progress=false", "--set", "run.tensorboard=false",
                           "--set", "run.dir=run"], cwd=tmp_path, capture_output=True, text=True, timeout=300,
                          preexec_fn=small_disk)
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr == "moemesh: error: run.dir=run: cannot write metrics.jsonl (File too large)\n"
    lines = (tmp_path / "run" / "metrics.jsonl").read_text().splitlines(keepends=True)
    assert 0 < len(lines) < 20 and all(line.endswith("\n") for line in lines)
    assert [json.loads(line)["step"] for line in lines] == list(range(1, len(lines) + 1))
    assert not (tmp_path / "run" / "summary.json").exists()


@pytest.mark.parametrize("argv", [["--help"], ["train", "--help"]], ids=["moemesh", "train"])
def test_help_exits_0(argv):
    proc = subprocess.run([sys.executable, "-m", "moemesh", *argv], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert "usage: moemesh" in proc.stdout
    if argv[0] == "train":
        assert "--set" in proc.stdout
        assert f"Presets: {', '.join(preset_names())}." in " ".join(proc.stdout.split())  # help wraps lines
        assert preset_names() == ["gpu", "shakespeare", "tiny"]


def test_version_prints_the_package_version():
    proc = subprocess.run([sys.executable, "-m", "moemesh", "--version"], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == f"moemesh {moemesh.__version__}\n"
    assert re.fullmatch(r"\d+\.\d+\.\d+\S*", moemesh.__version__)
