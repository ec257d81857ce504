"""metrics.jsonl and summary.json: whole records only, no NaN/Infinity literals, resumed runs cut and append."""

from __future__ import annotations

import errno
import json
import math
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from moemesh.errors import UserError
from moemesh.train import metrics
from moemesh.train.metrics import MetricsWriter, finite_json, write_summary


def _record(step: int, loss: float = 1.0) -> dict:
    return {"step": step, "loss": loss, "lm_loss": loss, "tokens_per_s": 100.0,
            "expert_load": [[0.5, 0.5], [0.25, 0.75]], "dropped_frac": [0.0, 0.125]}


def _strict_loads(text: str):
    def refuse(name):
        raise AssertionError(f"{name} literal in JSON")

    return json.loads(text, parse_constant=refuse)


def _writer(run_dir: Path, start_step: int = 0, tensorboard: bool = False) -> MetricsWriter:
    return MetricsWriter(run_dir, 100, tensorboard=tensorboard, progress=False, start_step=start_step)


def test_finite_json_maps_nan_and_inf_to_null_at_any_depth():
    obj = {"a": math.nan, "b": [1.0, math.inf, (-math.inf, 2)], "c": {"d": "nan", "e": 3}}
    assert finite_json(obj) == {"a": None, "b": [1.0, None, [None, 2]], "c": {"d": "nan", "e": 3}}


def test_non_finite_values_are_written_as_null(tmp_path: Path):
    writer = _writer(tmp_path)
    writer.log(_record(10, loss=math.nan) | {"grad_norm": math.inf})
    writer.close()
    record = _strict_loads((tmp_path / "metrics.jsonl").read_text())
    assert record["loss"] is None and record["grad_norm"] is None and record["step"] == 10
    write_summary(tmp_path, {"final_lm_loss": math.nan, "gap_to_floor": -math.inf, "steps": 3})
    summary = _strict_loads((tmp_path / "summary.json").read_text())
    assert summary == {"final_lm_loss": None, "gap_to_floor": None, "steps": 3}


def test_failed_write_leaves_the_file_as_it_was(tmp_path: Path, monkeypatch):
    writer = _writer(tmp_path)
    writer.log(_record(10))
    before = (tmp_path / "metrics.jsonl").read_bytes()
    real_write = os.write

    def half_then_enospc(fd, data):  # a disk that fills up in the middle of the record
        if len(data) > 10:
            return real_write(fd, bytes(data[: len(data) // 2]))
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(metrics.os, "write", half_then_enospc)
    with pytest.raises(UserError, match=rf"^run.dir={tmp_path}: cannot write metrics.jsonl \(No space left on device\)$"):
        writer.log(_record(20))
    writer.close()
    assert (tmp_path / "metrics.jsonl").read_bytes() == before


def test_file_size_limit_mid_record_leaves_whole_records(tmp_path: Path):
    """A real short write: RLIMIT_FSIZE lets the kernel write part of the record, then fail (EFBIG)."""
    script = textwrap.dedent(f"""
        import resource, signal
        from pathlib import Path
        from moemesh.errors import UserError
        from moemesh.train.metrics import MetricsWriter
        writer = MetricsWriter(Path({str(tmp_path)!r}), 100, tensorboard=False, progress=False)
        record = {{"step": 10, "loss": 1.0, "text": "x" * 200}}
        writer.log(record)
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # then the write fails with EFBIG instead of killing us
        size = (Path({str(tmp_path)!r}) / "metrics.jsonl").stat().st_size
        resource.setrlimit(resource.RLIMIT_FSIZE, (size + 50, resource.RLIM_INFINITY))
        try:
            writer.log(record | {{"step": 20}})
        except UserError as exc:
            print(exc)
    """)
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == f"run.dir={tmp_path}: cannot write metrics.jsonl (File too large)"
    lines = (tmp_path / "metrics.jsonl").read_text().splitlines(keepends=True)
    assert len(lines) == 1 and lines[0].endswith("\n") and _strict_loads(lines[0])["step"] == 10


def test_resumed_writer_cuts_steps_after_start_and_appends(tmp_path: Path):
    writer = _writer(tmp_path)
    for step in (10, 20, 30, 40, 50):
        writer.log(_record(step))
    writer.close()
    with open(tmp_path / "metrics.jsonl", "a") as file:
        file.write('{"step": 60, "lo')  # a torn last line, as a crash in an older version could leave
    writer = _writer(tmp_path, start_step=30)
    writer.log(_record(40, loss=2.0))
    writer.close()
    records = [_strict_loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [(r["step"], r["loss"]) for r in records] == [(10, 1.0), (20, 1.0), (30, 1.0), (40, 2.0)]


def test_fresh_writer_replaces_metrics(tmp_path: Path):
    (tmp_path / "metrics.jsonl").write_text('{"step": 10}\n')
    writer = _writer(tmp_path)
    writer.log(_record(5))
    writer.close()
    assert [_strict_loads(x)["step"] for x in (tmp_path / "metrics.jsonl").read_text().splitlines()] == [5]


def test_tensorboard_purges_rerun_steps_and_logs_dropped_frac(tmp_path: Path):
    event_accumulator = pytest.importorskip("tensorboard.backend.event_processing.event_accumulator")
    writer = _writer(tmp_path, tensorboard=True)
    for step in (10, 20, 30, 40, 50):
        writer.log(_record(step))
    writer.close()
    writer = _writer(tmp_path, start_step=30, tensorboard=True)
    writer.log(_record(40, loss=2.0))
    writer.close()
    events = event_accumulator.EventAccumulator(str(tmp_path / "tensorboard"))
    events.Reload()
    assert [(e.step, e.value) for e in events.Scalars("train/loss")] == [(10, 1.0), (20, 1.0), (30, 1.0), (40, 2.0)]
    assert [e.value for e in events.Scalars("dropped_frac/layer1")] == [0.125] * 4
    assert "expert_load/layer1/expert1" in events.Tags()["scalars"]
