"""Stopping on SIGINT / SIGTERM at a step boundary, at the same step on every rank.

A signal only records its number. After each step every rank contributes its flag to an all-reduce
(MAX) over the world, so all ranks learn the same answer at the same step even though the signal
reached them at slightly different times (a terminal's Ctrl-C reaches every process of its group, and
the launcher forwards the signal it received again). `train()` then raises `Stopped`, after the
checkpoint of that step is written, and the process exits with 128 + signum (130 SIGINT, 143 SIGTERM).

The handlers are process-global, so the installed `Stopper` is too: the CLI installs it (`handling_signals`)
around a run; `current()` is what `train()` asks, and without an installed one it never stops and issues
no collective, so library calls of `train()` (tests, notebooks) keep Python's own Ctrl-C.
"""

from __future__ import annotations

import contextlib
import os
import signal
import threading
import time
from pathlib import Path
from typing import Iterator

import torch
import torch.distributed as dist

from moemesh.errors import report
from moemesh.train.ckpt_paths import latest_checkpoint

SIGNALS = (signal.SIGINT, signal.SIGTERM)
# A repeat of the first signal this soon is the same request delivered twice (process group + launcher),
# not a second Ctrl-C: the launcher forwards its copy within a few ms of the terminal's.
DUPLICATE_S = 1.0


class Stopped(Exception):
    """Raised by `train()` on every rank after the step at which the ranks agreed to stop."""

    def __init__(self, signum: int, step: int):
        super().__init__(f"stopped by {signal.Signals(signum).name} after step {step}")
        self.signum, self.step = signum, step

    @property
    def exit_code(self) -> int:
        return 128 + self.signum


class Stopper:
    """Records the first SIGINT/SIGTERM; `agreed` turns the per-rank flags into one answer."""

    def __init__(self, active: bool = True, announce: bool = False):
        self.active = active  # False: never stops, never communicates (no handlers installed)
        self.announce = announce  # single process: say so when a second signal ends it at once
        self.signum: int | None = None
        self.received = 0  # every signal, duplicates included: a waiting rank watches this
        self._first_at = 0.0
        self._cpu_group = None
        self._cpu_group_made = False

    def handle(self, signum: int, frame) -> None:
        self.received += 1
        now = time.monotonic()
        if self.signum is None:
            self.signum, self._first_at = signum, now
            return
        if signum == self.signum and now - self._first_at < DUPLICATE_S:
            return
        # A second request: the user does not want to wait for the step and the checkpoint.
        if self.announce:
            report(f"{signal.Signals(signum).name} again: stopped at once, without a checkpoint")
        os._exit(128 + signum)

    def agreed(self, mesh, step: int) -> int | None:
        """The signal number if any rank received one before the end of `step` (same answer on every
        rank), else None. A collective on multi-rank meshes: call it on every rank at the same point."""
        if not self.active:
            return None
        if mesh is None:
            return self.signum
        flag = torch.tensor([self.signum or 0], dtype=torch.int64)  # CPU: never waits on a CUDA stream
        group = self._group()
        ranks = list(range(dist.get_world_size()))
        trace = mesh.trace
        trace.count += 1  # every rank checks after every step, so the numbering stays the same on all
        with trace.watching(f"#{trace.count} step {step} stop check: all_reduce_max on world group {ranks} shape [1]",
                            ranks):
            dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=group)
        return int(flag.item()) or None

    def _group(self):
        """The world's gloo group: the default one on gloo, one extra gloo group under NCCL (made once,
        at the first check, where every rank calls it)."""
        if not self._cpu_group_made:
            self._cpu_group = None if dist.get_backend() == "gloo" else dist.new_group(backend="gloo")
            self._cpu_group_made = True
        return self._cpu_group


_INACTIVE = Stopper(active=False)
_installed: Stopper | None = None


def current() -> Stopper:
    """The Stopper whose handlers are installed in this process, or one that never stops."""
    return _installed or _INACTIVE


@contextlib.contextmanager
def handling_signals(announce: bool = False) -> Iterator[Stopper]:
    """Install the SIGINT/SIGTERM handlers for the duration (main thread only), then restore the previous."""
    global _installed
    if threading.current_thread() is not threading.main_thread():
        yield _INACTIVE
        return
    stopper = Stopper(announce=announce)
    previous = {sig: signal.signal(sig, stopper.handle) for sig in SIGNALS}
    _installed = stopper
    try:
        yield stopper
    finally:
        _installed = None
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def stop_message(signum: int, step: int | None, run_dir: Path | None) -> str:
    """The one line a stopped run ends with."""
    when = f" after step {step}" if step is not None else ""
    return f"interrupted by {signal.Signals(signum).name}{when}; {checkpoint_clause(run_dir)}"


def checkpoint_clause(run_dir: Path | None) -> str:
    found = latest_checkpoint(run_dir) if run_dir is not None else None
    if found is None:
        return "no checkpoint was written"
    return f"checkpoint: {found} (run the same command to continue)"
