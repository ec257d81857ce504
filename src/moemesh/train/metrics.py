"""Run outputs on the main rank: metrics.jsonl, TensorBoard events, a progress bar, summary.json.

The JSON files never hold NaN or Infinity (not JSON: strict parsers such as `jq` reject them): a
non-finite float is written as null. metrics.jsonl only ever holds whole records, one per line: a
record is appended by one write and cut off again if the write fails, so a reader or a resumed run
never meets half a line.
"""

from __future__ import annotations

import json
import math
import os
import sys
from pathlib import Path
from typing import Any

from moemesh.errors import UserError
from moemesh.train.rundir import write_atomic

METRICS = "metrics.jsonl"
SUMMARY = "summary.json"


def finite_json(obj: Any) -> Any:
    """`obj` with every nan/inf float (also inside dicts, lists and tuples) replaced by None."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {key: finite_json(value) for key, value in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [finite_json(value) for value in obj]
    return obj


def to_json(obj: Any, **kwargs: Any) -> str:
    """json.dumps of `finite_json(obj)`; allow_nan=False makes a missed non-finite value an error, never
    a NaN literal in the file."""
    return json.dumps(finite_json(obj), allow_nan=False, **kwargs)


def write_summary(run_dir: Path, summary: dict[str, Any]) -> None:
    try:
        write_atomic(run_dir / SUMMARY, (to_json(summary, indent=2) + "\n").encode())
    except OSError as exc:
        raise UserError(f"run.dir={run_dir}: cannot write {SUMMARY} ({exc.strerror or exc})") from None


class MetricsWriter:
    """`start_step > 0` continues a resumed run: records after `start_step` (steps that will run again)
    are cut from metrics.jsonl and TensorBoard, and new records are appended."""

    def __init__(self, run_dir: Path, total_steps: int, tensorboard: bool, progress: bool, start_step: int = 0):
        self.run_dir = run_dir
        path = run_dir / METRICS
        try:
            if start_step > 0:
                _truncate_after(path, start_step)
            mode = os.O_APPEND if start_step > 0 else os.O_TRUNC
            self.fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_CLOEXEC | mode, 0o644)
        except OSError as exc:
            raise self._error(exc) from None
        self.tb = None
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter  # slow import: only when asked for

            purge_step = start_step + 1 if start_step > 0 else None  # drops events of steps > start_step
            self.tb = SummaryWriter(log_dir=str(run_dir / "tensorboard"), purge_step=purge_step)
        self.bar = None
        if progress:
            from tqdm import tqdm

            self.bar = tqdm(total=total_steps, initial=start_step, unit="step", dynamic_ncols=True,
                            file=sys.stderr, mininterval=0.5)

    def log(self, record: dict[str, Any]) -> None:
        self._append((to_json(record) + "\n").encode())
        step = record["step"]
        if self.tb is not None:
            for key, value in record.items():
                if isinstance(value, (int, float)) and key != "step":
                    self.tb.add_scalar("val/loss" if key == "val_loss" else f"train/{key}", value, step)
            for layer, load in enumerate(record.get("expert_load", [])):
                for expert, frac in enumerate(load):
                    self.tb.add_scalar(f"expert_load/layer{layer}/expert{expert}", frac, step)
            for layer, frac in enumerate(record.get("dropped_frac", [])):
                self.tb.add_scalar(f"dropped_frac/layer{layer}", frac, step)
        if self.bar is not None:
            self.bar.set_postfix(loss=f"{record['loss']:.4f}", tok_s=f"{record['tokens_per_s']:.0f}",
                                 **({"mfu": f"{100 * record['mfu']:.1f}%"} if "mfu" in record else {}))
            self.bar.update(step - self.bar.n)

    def _append(self, data: bytes) -> None:
        """One os.write of the whole line. The loop only runs after a short write (a full disk or a file
        size limit), whose next write then fails with the reason; the file is cut back on any failure."""
        size = os.lseek(self.fd, 0, os.SEEK_END)
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(self.fd, view):]
        except OSError as exc:
            try:
                os.ftruncate(self.fd, size)
            except OSError:
                pass  # the error being reported says more than this one
            raise self._error(exc) from None

    def _error(self, exc: OSError) -> UserError:
        return UserError(f"run.dir={self.run_dir}: cannot write {METRICS} ({exc.strerror or exc})")

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1
        if self.tb is not None:
            self.tb.close()
        if self.bar is not None:
            self.bar.close()


def _truncate_after(path: Path, start_step: int) -> None:
    """Cut metrics.jsonl before its first record of a step > start_step (or a line that is not a whole
    record, left by a run older than the single-write rule)."""
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        return
    keep = 0
    for line in data.splitlines(keepends=True):
        try:
            whole = line.endswith(b"\n") and json.loads(line)["step"] <= start_step
        except (ValueError, KeyError, TypeError):
            whole = False
        if not whole:
            break
        keep += len(line)
    if keep < len(data):
        os.truncate(path, keep)


def format_summary(summary: dict[str, Any]) -> str:
    first = summary.get("resumed_from_step") or 0
    done = f"{summary['steps']} steps" if not first else f"steps {first + 1}-{summary['steps']} (resumed)"
    lines = [f"moemesh: {done} in {summary['elapsed_s']:.1f} s, "
             f"{summary['tokens_per_s']:.0f} tokens/s, final lm loss {summary['final_lm_loss']:.4f} nats/token"]
    if summary.get("entropy_floor") is not None:
        lines.append(f"entropy floor of the synthetic source {summary['entropy_floor']:.4f} nats/token: "
                     f"loss is {100 * summary['gap_to_floor']:.1f}% above it")
    if summary.get("mfu") is not None:
        lines.append(f"{summary['tflops_per_gpu']:.0f} TFLOP/s per GPU, MFU {100 * summary['mfu']:.1f}%, "
                     f"peak memory {summary['peak_memory_gib']:.1f} GiB")
    if summary.get("val_loss") is not None:
        lines.append(f"validation loss {summary['val_loss']:.4f} nats/token")
    lines.append(f"run dir: {summary['run_dir']}")
    return "\n".join(lines)
